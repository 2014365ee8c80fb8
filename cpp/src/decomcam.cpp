// Decom-CAM numerics (see decomcam.hpp); Eigen for the symmetric eigendecomposition, OpenCV for resize
// and blur.
#include "decomcam.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <opencv2/imgproc.hpp>

namespace decomcam {

int effective_p(int top_p, int channels, int positions) { return std::min({top_p, channels, positions}); }

namespace {

template <typename G>
Decomposition decompose_impl(const float* act, const G* grad, int channels, int h, int w, int top_p) {
  using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const int n = h * w, p = effective_p(top_p, channels, n);
  Mat s(channels, n);  // S* [C, n]
  for (int c = 0; c < channels; ++c)
    for (int i = 0; i < n; ++i) s(c, i) = double(grad[size_t(c) * n + i]) * double(act[size_t(c) * n + i]);
  Eigen::MatrixXd gram = s.transpose() * s;  // [n, n]
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(gram);  // ascending eigenvalues
  const Eigen::VectorXd& lam = eig.eigenvalues();
  const Eigen::MatrixXd& vec = eig.eigenvectors();
  const double total = gram.trace();  // = sum of all sigma^2
  Eigen::RowVectorXd g = s.colwise().sum();  // channel-summed map [n]
  Decomposition d;
  d.p = p;
  d.n = n;
  d.feature_maps.assign(size_t(p) * n, 0.0);
  d.singular_values.resize(p);
  d.explained_variance.resize(p);
  d.null.resize(p);
  for (int i = 0; i < p; ++i) {
    int k = n - 1 - i;
    double sigma = std::sqrt(std::max(lam(k), 0.0));
    d.singular_values[i] = sigma;
    Eigen::VectorXd f = vec.col(k) * sigma;  // F_i = sigma_i v_i
    double dot = f.dot(g.transpose()), norms = f.norm() * g.norm();
    double sign;
    if (std::fabs(dot) <= kSignTol * norms) {
      Eigen::Index idx;
      f.cwiseAbs().maxCoeff(&idx);  // first largest-magnitude entry
      sign = (f(idx) > 0) - (f(idx) < 0);
    } else {
      sign = dot > 0 ? 1.0 : -1.0;
    }
    if (sign == 0) sign = 1.0;
    for (int j = 0; j < n; ++j) d.feature_maps[size_t(i) * n + j] = sign * f(j);
    d.explained_variance[i] = total > 0 ? sigma * sigma / total : 0.0;
  }
  const double s1 = p > 0 ? d.singular_values[0] : 0.0;
  d.share.assign(p, 0.0);
  for (int i = 0; i < p; ++i) {
    d.null[i] = d.singular_values[i] <= kNullTol * s1 || s1 <= 0;
    if (d.null[i]) {
      std::fill_n(d.feature_maps.begin() + size_t(i) * n, n, 0.0);
      continue;
    }
    double dot = 0.0, sv2 = d.singular_values[i] * d.singular_values[i];
    for (int j = 0; j < n; ++j) dot += d.feature_maps[size_t(i) * n + j] * g(j);
    d.share[i] = sv2 > 0 ? dot / sv2 : dot;
  }
  return d;
}

}  // namespace

Decomposition decompose(const float* act, const float* grad, int channels, int h, int w, int top_p) {
  return decompose_impl(act, grad, channels, h, w, top_p);
}

Decomposition decompose(const float* act, const double* grad, int channels, int h, int w, int top_p) {
  return decompose_impl(act, grad, channels, h, w, top_p);
}

std::vector<float> upsample_components(const Decomposition& dec, int h, int w, int size, bool bicubic) {
  const size_t plane = size_t(size) * size;
  std::vector<float> out(size_t(dec.p) * plane, 0.0f);
  for (int i = 0; i < dec.p; ++i) {
    if (dec.null[i]) continue;
    cv::Mat small(h, w, CV_32F);
    for (int j = 0; j < h * w; ++j) small.ptr<float>()[j] = float(dec.feature_maps[size_t(i) * dec.n + j]);
    cv::Mat up;
    cv::resize(small, up, cv::Size(size, size), 0, 0, bicubic ? cv::INTER_CUBIC : cv::INTER_LINEAR);
    double lo, hi;
    cv::minMaxLoc(up, &lo, &hi);
    const float flo = float(lo), den = std::max(float(hi) - flo, float(kNormEps));
    const float* src = up.ptr<float>();
    float* dst = out.data() + size_t(i) * plane;
    for (size_t j = 0; j < plane; ++j) dst[j] = (src[j] - flo) / den;
  }
  return out;
}

double blur_sigma(int size) { return 10.0 * size / 224.0; }
int blur_radius(int size) { return std::min(int(std::ceil(4.0 * blur_sigma(size))), size - 1); }

std::vector<float> build_masks(const std::vector<float>& x, const std::vector<float>& comps, int p, int size,
                               const float mean[3], const float std[3], double* blur_seconds) {
  const size_t plane = size_t(size) * size;
  auto t0 = std::chrono::steady_clock::now();
  cv::Mat pix(size, size, CV_32FC3);  // P = x * std + mean, [S, S, 3]
  float* pp = pix.ptr<float>();
  for (int c = 0; c < 3; ++c)
    for (size_t j = 0; j < plane; ++j) pp[3 * j + c] = x[c * plane + j] * std[c] + mean[c];
  cv::Mat blur;
  const int k = 2 * blur_radius(size) + 1;
  const double sigma = blur_sigma(size);
  cv::GaussianBlur(pix, blur, cv::Size(k, k), sigma, sigma, cv::BORDER_REFLECT_101);
  if (blur_seconds) *blur_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const float* pb = blur.ptr<float>();
  std::vector<float> batch(size_t(p + 1) * 3 * plane);
  for (int i = 0; i < p; ++i) {
    const float* hm = comps.data() + size_t(i) * plane;
    float* out = batch.data() + size_t(i) * 3 * plane;
    for (int c = 0; c < 3; ++c)
      for (size_t j = 0; j < plane; ++j) {
        float v = std::max(pp[3 * j + c] * hm[j], pb[3 * j + c] * (1.0f - hm[j]));
        out[c * plane + j] = (v - mean[c]) / std[c];
      }
  }
  float* out = batch.data() + size_t(p) * 3 * plane;
  for (int c = 0; c < 3; ++c)
    for (size_t j = 0; j < plane; ++j) out[c * plane + j] = (pb[3 * j + c] - mean[c]) / std[c];
  return batch;
}

Integration integrate(const std::vector<float>& y_masked, float y_blur, const std::vector<float>& comps,
                      const std::vector<bool>& null, int size) {
  const int p = int(y_masked.size());
  const size_t plane = size_t(size) * size;
  Integration r;
  r.scores.resize(p);
  r.weights.assign(p, 0.0);
  double zmax = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < p; ++i) {
    r.scores[i] = double(y_masked[i]) - double(y_blur);
    if (!null[i]) zmax = std::max(zmax, r.scores[i]);
  }
  if (!std::isfinite(zmax)) zmax = 0.0;
  double tot = 0.0;
  for (int i = 0; i < p; ++i)
    if (!null[i]) tot += (r.weights[i] = std::exp(r.scores[i] - zmax));
  for (int i = 0; i < p; ++i) r.weights[i] /= tot > 0 ? tot : 1.0;
  r.saliency.assign(plane, 0.0f);
  for (int i = 0; i < p; ++i) {
    const float wi = float(r.weights[i]);
    const float* hm = comps.data() + size_t(i) * plane;
    for (size_t j = 0; j < plane; ++j) r.saliency[j] += wi * hm[j];
  }
  return r;
}

Integration integrate_rank_p(const Decomposition& dec, int h, int w, int size) {
  const int n = h * w;
  Integration r;
  std::vector<double> cam(n, 0.0);
  double tot = 0.0;
  for (int i = 0; i < dec.p; ++i) {
    tot += dec.share[i];
    for (int j = 0; j < n; ++j) cam[j] += dec.share[i] * dec.feature_maps[size_t(i) * dec.n + j];
  }
  r.weights.resize(dec.p);
  for (int i = 0; i < dec.p; ++i) r.weights[i] = dec.share[i] / (tot != 0 ? tot : 1.0);
  cv::Mat small(h, w, CV_32F), up;
  for (int j = 0; j < n; ++j) small.ptr<float>()[j] = float(std::max(cam[j], 0.0));
  cv::resize(small, up, cv::Size(size, size), 0, 0, cv::INTER_CUBIC);
  double lo, hi;
  cv::minMaxLoc(up, &lo, &hi);
  const float flo = float(lo), den = std::max(float(hi) - flo, float(kNormEps));
  const size_t plane = size_t(size) * size;
  r.saliency.resize(plane);
  const float* src = up.ptr<float>();
  for (size_t j = 0; j < plane; ++j) r.saliency[j] = (src[j] - flo) / den;
  return r;
}

}  // namespace decomcam

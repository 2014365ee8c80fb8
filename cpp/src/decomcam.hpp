// Decom-CAM numerics for one image (paper variant), the same choices as runtime/decomcam.py and
// runtime/config.py:
//   decompose        S* = dy/dA * A [C, n] (float64), Gram G = S*^T S* [n, n], top-p eigenpairs,
//                    F = Sigma_p V_p^T, each F_i oriented to a positive dot with the channel sum of S*
//                    (else its largest-magnitude entry positive); sigma_i <= 1e-3 sigma_1 -> null
//   upsample         bilinear (OpenCV INTER_LINEAR, half-pixel) to S x S, min-max with eps 1e-7; null -> 0
//   build_masks      blend in [0, 1] pixel space: max(P * H, blur(P) * (1 - H)), Gaussian blur sigma
//                    10 * S / 224 px, radius ceil(4 sigma) capped at S - 1, reflect-101
//   integrate        C_i = y(masked_i) - y(blurred); softmax over the non-null C_i; saliency = sum w_i H_i
// and the "ig" integration (decomcam-ig): the same decomposition of S_IG = A * the path-averaged gradient,
//   integrate_rank_p saliency = min-max(bicubic(relu(sum_i a_i F_i))), a_i = <F_i, g> / sigma_i^2, g the
//                    channel sum; weights a_i / sum_j a_j; components upsampled bicubically
#pragma once
#include <vector>

namespace decomcam {

constexpr double kNormEps = 1e-7;
constexpr double kNullTol = 1e-3;
constexpr double kSignTol = 1e-6;

struct Decomposition {
  int p = 0, n = 0;
  std::vector<double> feature_maps;        // [p, n] signed F_i; null components are 0
  std::vector<double> singular_values;     // [p]
  std::vector<double> explained_variance;  // [p] sigma_i^2 / sum of all sigma^2
  std::vector<bool> null;                  // [p]
  std::vector<double> share;               // [p] a_i = <F_i, g> / sigma_i^2 (0 for null components)
};

// min(top_p, C, n): the number of components.
int effective_p(int top_p, int channels, int positions);

// act, grad [C, h*w] float32 -> the top-p feature maps.
Decomposition decompose(const float* act, const float* grad, int channels, int h, int w, int top_p);
// The same with a float64 gradient (the path-averaged one of decomcam-ig).
Decomposition decompose(const float* act, const double* grad, int channels, int h, int w, int top_p);

// F -> H [p, S, S] float32 in [0, 1] (bilinear; bicubic with `bicubic`).
std::vector<float> upsample_components(const Decomposition& dec, int h, int w, int size, bool bicubic = false);

// Gaussian sigma and radius at input side S.
double blur_sigma(int size);
int blur_radius(int size);

// x [3, S, S] normalised, H [p, S, S] -> the classify batch [(p + 1), 3, S, S]: p masked images, then the
// blurred one, all normalised.
std::vector<float> build_masks(const std::vector<float>& x, const std::vector<float>& comps, int p, int size,
                               const float mean[3], const float std[3], double* blur_seconds = nullptr);

struct Integration {
  std::vector<float> saliency;  // [S, S]
  std::vector<double> weights;  // [p]
  std::vector<double> scores;   // [p] C_i
};

// y_masked [p], y_blur: target logits -> saliency, weights, gains.
Integration integrate(const std::vector<float>& y_masked, float y_blur, const std::vector<float>& comps,
                      const std::vector<bool>& null, int size);

// The "ig" integration: the rank-p share map, ReLU at h x w, bicubic to S x S, min-max; no scores.
Integration integrate_rank_p(const Decomposition& dec, int h, int w, int size);

}  // namespace decomcam

// Sessions, feeds and the per-image pipeline (runtime/explainer.py + runtime/methods/decomcam.py).
#include "explainer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "decomcam.hpp"

namespace decomcam {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return s;
}

}  // namespace

Explainer::Explainer(const std::string& dir, const std::string& class_set, bool verify, int threads, int batch_size)
    : art_(dir), batch_size_(batch_size), env_(ORT_LOGGING_LEVEL_ERROR, "decomcam"),
      mem_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
  const Manifest& m = art_.manifest();
  if (!class_set.empty() && !m.text_input())
    throw ArtifactsError(dir + ": " + m.model + " has fixed classes ('" + m.default_class_set +
                         "'); choosing a class set applies to CLIP exports only");
  std::string explain_path = art_.check_graph("explain", verify);
  std::string classify_path = art_.check_graph("classify", verify);
  classes_ = art_.load_class_set(class_set);
  opts_.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  opts_.SetInterOpNumThreads(1);
  if (threads > 0) opts_.SetIntraOpNumThreads(threads);
  try {
    explain_ = std::make_unique<Ort::Session>(env_, explain_path.c_str(), opts_);
    classify_ = std::make_unique<Ort::Session>(env_, classify_path.c_str(), opts_);
  } catch (const Ort::Exception& e) {
    throw ArtifactsError(dir + ": ONNX Runtime cannot load the graphs (" + std::string(e.what()) + ")");
  }
}

int Explainer::resolve_target(const std::string& target) const {
  const auto& labels = classes_.labels;
  if (target.empty()) return -1;
  if (std::all_of(target.begin(), target.end(), ::isdigit) || (target[0] == '-' && target.size() > 1 &&
                                                               std::all_of(target.begin() + 1, target.end(), ::isdigit))) {
    long long i = std::stoll(target);
    if (i < 0 || i >= (long long)labels.size())
      throw TargetError("target index " + target + " is out of range for class set '" + classes_.name + "' (" +
                        std::to_string(labels.size()) + " classes)");
    return int(i);
  }
  for (size_t i = 0; i < labels.size(); ++i)
    if (labels[i] == target) return int(i);
  for (size_t i = 0; i < labels.size(); ++i)
    if (lower(labels[i]) == lower(target)) return int(i);
  throw TargetError("unknown target class '" + target + "' in class set '" + classes_.name + "'");
}

std::vector<Ort::Value> Explainer::feed(std::vector<float>& images, int n, std::vector<int64_t>* target) {
  const Manifest& m = art_.manifest();
  const int64_t s = m.input_size;
  std::vector<Ort::Value> in;
  std::vector<int64_t> ishape = {n, 3, s, s};
  in.push_back(Ort::Value::CreateTensor<float>(mem_, images.data(), size_t(n) * 3 * s * s, ishape.data(), 4));
  if (m.text_input()) {
    std::vector<int64_t> tshape = {int64_t(classes_.labels.size()), int64_t(m.dims.at("D"))};
    in.push_back(Ort::Value::CreateTensor<float>(mem_, classes_.embeddings.data(), classes_.embeddings.size(),
                                                 tshape.data(), 2));
  }
  if (target) {
    std::vector<int64_t> gshape = {n};
    in.push_back(Ort::Value::CreateTensor<int64_t>(mem_, target->data(), target->size(), gshape.data(), 1));
  }
  return in;
}

std::vector<float> Explainer::classify(const std::vector<float>& images, int n) {
  const size_t per = size_t(3) * art_.manifest().input_size * art_.manifest().input_size;
  const size_t l = classes_.labels.size();
  std::vector<float> logits(size_t(n) * l);
  std::vector<std::string> in_names = art_.expected_inputs("classify");
  std::vector<const char*> inn;
  for (auto& s : in_names) inn.push_back(s.c_str());
  const char* outn[] = {"logits"};
  for (int i = 0; i < n; i += batch_size_) {
    int b = std::min(batch_size_, n - i);
    std::vector<float> chunk(images.begin() + i * per, images.begin() + (i + b) * per);
    auto in = feed(chunk, b, nullptr);
    auto out = classify_->Run(Ort::RunOptions{nullptr}, inn.data(), in.data(), in.size(), outn, 1);
    const float* y = out[0].GetTensorData<float>();
    std::copy(y, y + size_t(b) * l, logits.begin() + size_t(i) * l);
  }
  return logits;
}

Explanation Explainer::explain(const std::vector<float>& x_in, int target, int top_p) {
  const Manifest& m = art_.manifest();
  const int size = m.input_size, c = m.dims.at("C"), h = m.dims.at("h"), w = m.dims.at("w");
  const size_t l = classes_.labels.size();
  Explanation e;
  std::vector<float> x = x_in;

  auto t = Clock::now();
  std::vector<int64_t> tgt = {target};
  std::vector<std::string> in_names = art_.expected_inputs("explain");
  std::vector<const char*> inn;
  for (auto& s : in_names) inn.push_back(s.c_str());
  const char* outn[] = {"logits", "activations", "gradients"};
  auto in = feed(x, 1, &tgt);
  auto out = explain_->Run(Ort::RunOptions{nullptr}, inn.data(), in.data(), in.size(), outn, 3);
  for (int k = 1; k < 3; ++k) {
    auto shape = out[k].GetTensorTypeAndShapeInfo().GetShape();
    if (shape != std::vector<int64_t>{1, c, h, w})
      throw ArtifactsError(art_.dir() + "/explain.onnx: output '" + outn[k] + "' shape differs from the manifest's dims");
  }
  const float* lg = out[0].GetTensorData<float>();
  e.logits.assign(lg, lg + l);
  e.timings.push_back({"explain", since(t)});
  e.target = target >= 0 ? target : int(std::max_element(e.logits.begin(), e.logits.end()) - e.logits.begin());
  e.target_name = classes_.labels[e.target];

  t = Clock::now();
  Decomposition dec = decompose(out[1].GetTensorData<float>(), out[2].GetTensorData<float>(), c, h, w, top_p);
  e.timings.push_back({"decompose", since(t)});
  t = Clock::now();
  e.components = upsample_components(dec, h, w, size);
  double up_s = since(t), blur_s = 0;
  e.timings.push_back({"upsample", up_s});
  std::vector<float> batch = build_masks(x, e.components, dec.p, size, m.mean, m.std, &blur_s);
  double masks_s = since(t);
  e.timings.push_back({"blur", blur_s});
  e.timings.push_back({"blend", masks_s - up_s - blur_s});

  t = Clock::now();
  std::vector<float> y = classify(batch, dec.p + 1);  // [(p + 1), L]
  e.timings.push_back({"classify", since(t)});

  t = Clock::now();
  std::vector<float> ym(dec.p);
  for (int i = 0; i < dec.p; ++i) ym[i] = y[size_t(i) * l + e.target];
  Integration r = integrate(ym, y[size_t(dec.p) * l + e.target], e.components, dec.null, size);
  e.p = dec.p;
  e.saliency = std::move(r.saliency);
  e.weights = std::move(r.weights);
  e.scores = std::move(r.scores);
  e.explained_variance = dec.explained_variance;
  e.singular_values = dec.singular_values;
  // top-5 by softmax probability over the class set (stable order for ties)
  double zmax = *std::max_element(e.logits.begin(), e.logits.end()), tot = 0;
  std::vector<double> prob(l);
  for (size_t i = 0; i < l; ++i) tot += (prob[i] = std::exp(double(e.logits[i]) - zmax));
  std::vector<size_t> order(l);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return prob[a] > prob[b]; });
  for (size_t i = 0; i < std::min<size_t>(5, l); ++i) e.top5.push_back({classes_.labels[order[i]], prob[order[i]] / tot});
  e.timings.push_back({"integrate", since(t)});
  return e;
}

}  // namespace decomcam

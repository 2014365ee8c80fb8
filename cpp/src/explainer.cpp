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

Explainer::Explainer(const std::string& dir, const std::string& class_set, bool verify, int threads, int batch_size,
                     const std::string& method, int ig_steps)
    : art_(dir), batch_size_(batch_size), method_(method), ig_steps_(ig_steps),
      env_(ORT_LOGGING_LEVEL_ERROR, "decomcam"), mem_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
  const Manifest& m = art_.manifest();
  if (method != "decomcam" && method != "decomcam-ig")
    throw std::invalid_argument("unknown method '" + method + "'; valid: decomcam, decomcam-ig");
  if (ig_steps < 1) throw std::invalid_argument("ig_steps must be >= 1");
  if (batch_size < 1) throw std::invalid_argument("batch_size must be >= 1");
  if (!class_set.empty() && !m.text_input())
    throw ArtifactsError(dir + ": " + m.model + " has fixed classes ('" + m.default_class_set +
                         "'); choosing a class set applies to CLIP exports only");
  const bool ig = method == "decomcam-ig";
  std::vector<std::pair<std::string, std::unique_ptr<Ort::Session>*>> graphs;
  if (ig) graphs = {{"features", &features_}, {"head_grad", &head_grad_}};
  else graphs = {{"explain", &explain_}, {"classify", &classify_}};
  std::vector<std::string> paths;
  for (auto& [name, _] : graphs) paths.push_back(art_.check_graph(name, verify));
  classes_ = art_.load_class_set(class_set);
  opts_.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  opts_.SetInterOpNumThreads(1);
  if (threads > 0) opts_.SetIntraOpNumThreads(threads);
  try {
    for (size_t i = 0; i < graphs.size(); ++i)
      *graphs[i].second = std::make_unique<Ort::Session>(env_, paths[i].c_str(), opts_);
  } catch (const Ort::Exception& e) {
    throw ArtifactsError(dir + ": ONNX Runtime cannot load the graphs (" + std::string(e.what()) + ")");
  }
  for (size_t i = 0; i < graphs.size(); ++i) check_io(**graphs[i].second, graphs[i].first, paths[i]);
}

// The graph's own declared inputs and outputs against the contract and the manifest's dims, before any image:
// a graph swapped for another (its checksum updated) or a manifest whose dims were changed is a usage error.
void Explainer::check_io(Ort::Session& session, const std::string& graph, const std::string& path) const {
  const Manifest& m = art_.manifest();
  Ort::AllocatorWithDefaultOptions alloc;
  for (bool outputs : {false, true}) {
    const char* kind = outputs ? "output" : "input";
    std::map<std::string, std::vector<int64_t>> got;
    const size_t n = outputs ? session.GetOutputCount() : session.GetInputCount();
    for (size_t k = 0; k < n; ++k) {
      auto name = outputs ? session.GetOutputNameAllocated(k, alloc) : session.GetInputNameAllocated(k, alloc);
      auto info = outputs ? session.GetOutputTypeInfo(k) : session.GetInputTypeInfo(k);
      got[name.get()] = info.GetTensorTypeAndShapeInfo().GetShape();
    }
    for (const auto& [name, axes] : art_.expected_io(graph, outputs)) {
      auto it = got.find(name);
      if (it == got.end())
        throw ArtifactsError(path + ": has no " + kind + " '" + name + "'; the graph does not match manifest.json");
      if (it->second.size() != axes.size())
        throw ArtifactsError(path + ": " + kind + " '" + name + "' has " + std::to_string(it->second.size()) +
                             " axes, the contract " + std::to_string(axes.size()));
      for (size_t a = 0; a < axes.size(); ++a) {
        const std::string& ax = axes[a];
        if (ax == "batch" || ax == "L" || it->second[a] < 0) continue;  // dynamic
        long long want = std::all_of(ax.begin(), ax.end(), ::isdigit) ? std::stoll(ax)
                         : ax == "H" || ax == "W" ? m.input_size
                         : m.dims.count(ax) ? m.dims.at(ax) : -1;
        if (want >= 0 && it->second[a] != want)
          throw ArtifactsError(path + ": " + kind + " '" + name + "' axis " + ax + " is " +
                               std::to_string(it->second[a]) + " in the graph and " + std::to_string(want) +
                               " in manifest.json; the graph does not match its manifest");
      }
    }
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

std::vector<Ort::Value> Explainer::feed(std::vector<float>& images, int n, std::vector<int64_t>* target,
                                        const std::vector<int64_t>& shape) {
  const Manifest& m = art_.manifest();
  const int64_t s = m.input_size;
  std::vector<Ort::Value> in;
  std::vector<int64_t> ishape = shape.empty() ? std::vector<int64_t>{n, 3, s, s} : shape;  // images, or activations
  size_t count = 1;
  for (int64_t d : ishape) count *= size_t(d);
  in.push_back(Ort::Value::CreateTensor<float>(mem_, images.data(), count, ishape.data(), ishape.size()));
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
  if (!classify_) throw std::logic_error("classify.onnx is not loaded for method " + method_);
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

std::vector<double> Explainer::path_gradient(const float* act, int target) {
  const Manifest& m = art_.manifest();
  const int64_t c = m.dims.at("C"), h = m.dims.at("h"), w = m.dims.at("w");
  const size_t per = size_t(c) * h * w;
  std::vector<std::string> in_names = art_.expected_inputs("head_grad");
  std::vector<const char*> inn;
  for (auto& s : in_names) inn.push_back(s.c_str());
  const char* outn[] = {"gradients"};
  std::vector<double> total(per, 0.0);
  for (int k0 = 0; k0 < ig_steps_; k0 += batch_size_) {  // one image: batch_size steps per call
    const int b = std::min(batch_size_, ig_steps_ - k0);
    std::vector<float> rows(size_t(b) * per);
    for (int r = 0; r < b; ++r) {
      const float alpha = float((k0 + r + 0.5) / ig_steps_);
      float* row = rows.data() + size_t(r) * per;
      for (size_t j = 0; j < per; ++j) row[j] = act[j] * alpha;
    }
    std::vector<int64_t> tgt(b, target);
    auto in = feed(rows, b, &tgt, {b, c, h, w});
    auto out = head_grad_->Run(Ort::RunOptions{nullptr}, inn.data(), in.data(), in.size(), outn, 1);
    if (out[0].GetTensorTypeAndShapeInfo().GetShape() != std::vector<int64_t>{b, c, h, w})
      throw ArtifactsError(art_.dir() + "/head_grad.onnx: output 'gradients' shape differs from the manifest's dims");
    const float* g = out[0].GetTensorData<float>();
    for (int r = 0; r < b; ++r)
      for (size_t j = 0; j < per; ++j) total[j] += double(g[size_t(r) * per + j]);
  }
  for (double& v : total) v /= ig_steps_;
  return total;
}

std::vector<float> Explainer::features(std::vector<float>& x, std::vector<float>* logits) {
  const Manifest& m = art_.manifest();
  const int c = m.dims.at("C"), h = m.dims.at("h"), w = m.dims.at("w");
  std::vector<std::string> in_names = art_.expected_inputs("features");
  std::vector<const char*> inn;
  for (auto& s : in_names) inn.push_back(s.c_str());
  const char* outn[] = {"logits", "activations"};
  auto in = feed(x, 1, nullptr);
  auto out = features_->Run(Ort::RunOptions{nullptr}, inn.data(), in.data(), in.size(), outn, 2);
  if (out[1].GetTensorTypeAndShapeInfo().GetShape() != std::vector<int64_t>{1, c, h, w})
    throw ArtifactsError(art_.dir() + "/features.onnx: output 'activations' shape differs from the manifest's dims");
  if (logits) {
    const float* lg = out[0].GetTensorData<float>();
    logits->assign(lg, lg + classes_.labels.size());
  }
  const float* a = out[1].GetTensorData<float>();
  return std::vector<float>(a, a + size_t(c) * h * w);
}

void Explainer::explain_ig(Explanation& e, std::vector<float>& x, int target, int top_p) {
  const Manifest& m = art_.manifest();
  const int size = m.input_size, c = m.dims.at("C"), h = m.dims.at("h"), w = m.dims.at("w");
  auto t = Clock::now();
  std::vector<float> act = features(x, &e.logits);
  e.timings.push_back({"explain", since(t)});
  e.target = target >= 0 ? target : int(std::max_element(e.logits.begin(), e.logits.end()) - e.logits.begin());
  e.target_name = classes_.labels[e.target];

  t = Clock::now();
  std::vector<double> grad = path_gradient(act.data(), e.target);
  e.timings.push_back({"head_grad", since(t)});
  t = Clock::now();
  Decomposition dec = decompose(act.data(), grad.data(), c, h, w, top_p);
  e.timings.push_back({"decompose", since(t)});
  t = Clock::now();
  e.components = upsample_components(dec, h, w, size, true);
  e.timings.push_back({"upsample", since(t)});
  t = Clock::now();
  Integration r = integrate_rank_p(dec, h, w, size);
  e.p = dec.p;
  e.saliency = std::move(r.saliency);
  e.weights = std::move(r.weights);
  e.explained_variance = dec.explained_variance;
  e.singular_values = dec.singular_values;
  e.timings.push_back({"integrate", since(t)});
}

Explanation Explainer::explain(const std::vector<float>& x_in, int target, int top_p) {
  const Manifest& m = art_.manifest();
  const int size = m.input_size, c = m.dims.at("C"), h = m.dims.at("h"), w = m.dims.at("w");
  const size_t l = classes_.labels.size();
  Explanation e;
  std::vector<float> x = x_in;
  if (method_ == "decomcam-ig") {
    explain_ig(e, x, target, top_p);
    top5(e);
    return e;
  }

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
  top5(e);
  e.timings.push_back({"integrate", since(t)});
  return e;
}

void Explainer::top5(Explanation& e) const {
  // top-5 by softmax probability over the class set (stable order for ties)
  const size_t l = classes_.labels.size();
  double zmax = *std::max_element(e.logits.begin(), e.logits.end()), tot = 0;
  std::vector<double> prob(l);
  for (size_t i = 0; i < l; ++i) tot += (prob[i] = std::exp(double(e.logits[i]) - zmax));
  std::vector<size_t> order(l);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return prob[a] > prob[b]; });
  for (size_t i = 0; i < std::min<size_t>(5, l); ++i) e.top5.push_back({classes_.labels[order[i]], prob[order[i]] / tot});
}

}  // namespace decomcam

// The pipeline for one image: explain.onnx (logits, activations, gradients), Decom-CAM, classify.onnx on
// the p masked + 1 blurred images; or, for decomcam-ig, features.onnx (logits, activations) and head_grad.onnx
// at alpha_k A (the path-averaged gradient), the decomposition of S_IG and the rank-p map. Sessions are
// created once and reused.
#pragma once
#include <map>
#include <memory>
#include <onnxruntime_cxx_api.h>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "artifacts.hpp"

namespace decomcam {

// An unknown or out-of-range target class (a usage error).
struct TargetError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Explanation {
  int target = -1;
  std::string target_name;
  int p = 0;                                    // components
  std::vector<float> saliency;                  // [S, S] in [0, 1], model-input coordinates
  std::vector<float> components;                // [p, S, S]
  std::vector<double> weights, scores;          // [p] (no scores for decomcam-ig)
  std::vector<double> explained_variance, singular_values;  // [p]
  std::vector<float> logits;                    // [L]
  std::vector<std::pair<std::string, double>> top5;  // (class, softmax probability)
  std::vector<std::pair<std::string, double>> timings;  // stage -> seconds, in pipeline order
};

class Explainer {
 public:
  // Checks the graphs the method runs (sha256 unless verify is false) and loads the class set.
  // method: "decomcam" (explain + classify) or "decomcam-ig" (features + head_grad, ig_steps midpoints of the
  // path alpha * A).
  explicit Explainer(const std::string& artifacts_dir, const std::string& class_set = "", bool verify = true,
                     int intra_op_threads = 0, int batch_size = 32, const std::string& method = "decomcam",
                     int ig_steps = 16);
  const std::string& method() const { return method_; }
  const Artifacts& artifacts() const { return art_; }
  const ClassSet& classes() const { return classes_; }
  // A class name (exact, then case-insensitive) or index -> index; "" -> -1 (top-1). Throws TargetError.
  int resolve_target(const std::string& target) const;
  // x [3, S, S] normalised -> the explanation; target -1 = top-1.
  Explanation explain(const std::vector<float>& x, int target, int top_p);
  // images [N, 3, S, S] -> logits [N, L] through classify.onnx, in chunks of batch_size.
  std::vector<float> classify(const std::vector<float>& images, int n);
  int num_classes() const { return int(classes_.labels.size()); }

 private:
  Artifacts art_;
  ClassSet classes_;
  int batch_size_;
  std::string method_;
  int ig_steps_;
  Ort::Env env_;
  Ort::SessionOptions opts_;
  std::unique_ptr<Ort::Session> explain_, classify_, features_, head_grad_;
  Ort::MemoryInfo mem_;
  std::vector<Ort::Value> feed(std::vector<float>& images, int n, std::vector<int64_t>* target,
                               const std::vector<int64_t>& shape = {});
  // mean_k d y_target / d A at A0 + alpha_k (A - A0), alpha_k = (k + 1/2) / ig_steps (A0 = base, or 0 when
  // base is null), through head_grad.onnx
  std::vector<double> path_gradient(const float* act, int target);
  void check_io(Ort::Session& session, const std::string& graph, const std::string& path) const;
  // images [1, 3, S, S] -> the target layer's activations [C * h * w] through features.onnx (logits: [L] when
  // given)
  std::vector<float> features(std::vector<float>& x, std::vector<float>* logits);
  void explain_ig(Explanation& e, std::vector<float>& x, int target, int top_p);
  void top5(Explanation& e) const;
};

}  // namespace decomcam

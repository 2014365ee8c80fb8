// An artifacts folder written by `python -m export`: manifest.json (validated field by field), graph
// integrity (sha256 against the manifest) and the class sets. The manifest is the only thing the C++
// consumer takes from the Python side.
#pragma once
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace decomcam {

// A missing, malformed, incomplete or tampered artifacts folder; what() is one line naming the file.
struct ArtifactsError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct GraphEntry {
  std::string file;                      // relative to the artifacts folder
  std::string sha256;                    // hex digest of the file
  std::vector<std::string> input_names;  // declared inputs, in order
};

struct ClassSetEntry {
  std::string labels;      // path of the labels file (one class per line)
  std::string embeddings;  // path of the [L, D] float32 .npy (clip); empty for fixed classes
  std::string sha256;      // sha256 of the embeddings (clip); may be empty
  int count = 0;
};

struct Preprocess {
  std::string resize = "crop";           // "crop" (shortest side, centre crop) or "stretch"
  int resize_size = 0;                   // crop: shortest side before the crop (>= input_size)
  std::string interpolation = "bicubic"; // Pillow's "bicubic" or "bilinear"
};

struct Manifest {
  std::string family;        // "clip" (text input) or "pooled-linear" (fixed classes)
  std::string model;
  int input_size = 0;        // S
  Preprocess preprocess;
  float mean[3], std[3];
  double logit_scale = 1.0;
  std::map<std::string, int> dims;  // H, W, C, h, w and D (clip) or K (pooled-linear)
  std::map<std::string, GraphEntry> graphs;
  std::map<std::string, ClassSetEntry> class_sets;
  std::string default_class_set;
  bool random_weights = false;
  bool text_input() const { return family == "clip"; }
};

struct ClassSet {
  std::string name;
  std::vector<std::string> labels;
  std::vector<float> embeddings;  // [L, D] row-major; empty for fixed classes
};

class Artifacts {
 public:
  // Read and validate DIR/manifest.json; throws ArtifactsError.
  explicit Artifacts(const std::string& dir);
  const Manifest& manifest() const { return m_; }
  const std::string& dir() const { return dir_; }
  // The graph's path after checking it is listed, present, declares the family's inputs and (when
  // `verify`) that its sha256 matches the manifest.
  std::string check_graph(const std::string& name, bool verify = true) const;
  // A class set (the manifest's default when `name` is empty), checked against dims and sha256.
  ClassSet load_class_set(const std::string& name = "") const;
  // The input names the family's graphs declare (runtime/spec.py).
  std::vector<std::string> expected_inputs(const std::string& graph) const;
  // The graph's declared inputs and outputs as (name, axis names) pairs, runtime/spec.py's contract: axes
  // "batch" and "L" are dynamic, digits are literal sizes, the others are manifest dims (H, W, C, h, w, K, D).
  using Tensor = std::pair<std::string, std::vector<std::string>>;
  std::vector<Tensor> expected_io(const std::string& graph, bool outputs) const;

 private:
  std::string dir_, mpath_;
  Manifest m_;
};

}  // namespace decomcam

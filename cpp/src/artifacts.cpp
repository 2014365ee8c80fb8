// Manifest validation, graph integrity and class sets.
#include "artifacts.hpp"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include "npy.hpp"
#include "sha256.hpp"

namespace decomcam {
namespace {

using json = nlohmann::json;
constexpr int kManifestVersion = 1;

bool is_file(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_dir(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

// Typed access to manifest fields: every failure is one line naming manifest.json and the field.
struct Fields {
  std::string mpath;
  ArtifactsError fail(const std::string& field, const std::string& problem) const {
    return ArtifactsError(mpath + ": field '" + field + "' " + problem);
  }
  const json& get(const json& obj, const std::string& key, const std::string& field) const {
    if (!obj.is_object() || !obj.contains(key)) throw fail(field, "is missing");
    return obj.at(key);
  }
  std::string str(const json& obj, const std::string& key, const std::string& field) const {
    const json& v = get(obj, key, field);
    if (!v.is_string() || v.get<std::string>().empty()) throw fail(field, "must be a non-empty string");
    return v.get<std::string>();
  }
  int integer(const json& obj, const std::string& key, const std::string& field, int lo = 1) const {
    const json& v = get(obj, key, field);
    if (!v.is_number_integer() || v.get<long long>() < lo) throw fail(field, "must be an integer >= " + std::to_string(lo));
    return v.get<int>();
  }
  double number(const json& obj, const std::string& key, const std::string& field) const {
    const json& v = get(obj, key, field);
    if (!v.is_number() || !std::isfinite(v.get<double>())) throw fail(field, "must be a finite number");
    return v.get<double>();
  }
  const json& object(const json& obj, const std::string& key, const std::string& field) const {
    const json& v = get(obj, key, field);
    if (!v.is_object()) throw fail(field, "must be an object");
    return v;
  }
  void triple(const json& obj, const std::string& key, float out[3], bool positive) const {
    const json& v = get(obj, key, key);
    if (!v.is_array() || v.size() != 3) throw fail(key, "must be a list of 3 numbers (R, G, B)");
    for (int i = 0; i < 3; ++i) {
      if (!v[i].is_number() || (positive && !(v[i].get<double>() > 0)))
        throw fail(key, positive ? "must hold 3 positive numbers" : "must hold 3 numbers");
      out[i] = v[i].get<float>();
    }
  }
};

bool is_hex64(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!std::isxdigit(static_cast<unsigned char>(c))) return false;
  return true;
}

}  // namespace

Artifacts::Artifacts(const std::string& dir) : dir_(dir), mpath_(dir + "/manifest.json") {
  if (!is_dir(dir)) throw ArtifactsError(dir + ": artifacts folder not found (create it with `python -m export ... --out " + dir + "`)");
  if (!is_file(mpath_)) throw ArtifactsError(mpath_ + ": manifest missing; not an artifacts folder written by `python -m export`");
  std::ifstream f(mpath_);
  json j;
  try {
    j = json::parse(f);
  } catch (const json::exception& e) {
    std::string what = e.what();
    throw ArtifactsError(mpath_ + ": not valid JSON (" + what.substr(what.find(']') + 2) + ")");
  }
  Fields F{mpath_};
  if (!j.is_object()) throw ArtifactsError(mpath_ + ": not a JSON object");
  const json& ver = F.get(j, "format_version", "format_version");
  if (!ver.is_number_integer() || ver.get<int>() != kManifestVersion)
    throw F.fail("format_version", "is " + ver.dump() + ", this consumer reads " + std::to_string(kManifestVersion));
  m_.family = j.contains("family") ? F.str(j, "family", "family") : "clip";
  if (m_.family != "clip" && m_.family != "pooled-linear")
    throw F.fail("family", "is '" + m_.family + "'; valid families: clip, pooled-linear");
  m_.model = F.str(j, "model", "model");
  m_.input_size = F.integer(j, "input_size", "input_size");
  m_.preprocess.resize_size = m_.input_size;
  if (j.contains("preprocess") && !j["preprocess"].is_null()) {
    const json& pre = F.object(j, "preprocess", "preprocess");
    if (pre.contains("resize")) m_.preprocess.resize = F.str(pre, "resize", "preprocess.resize");
    if (pre.contains("resize_size")) m_.preprocess.resize_size = F.integer(pre, "resize_size", "preprocess.resize_size");
    if (pre.contains("interpolation")) m_.preprocess.interpolation = F.str(pre, "interpolation", "preprocess.interpolation");
    if (m_.preprocess.resize != "crop" && m_.preprocess.resize != "stretch")
      throw F.fail("preprocess.resize", "is '" + m_.preprocess.resize + "'; valid: crop, stretch");
    if (m_.preprocess.interpolation != "bicubic" && m_.preprocess.interpolation != "bilinear")
      throw F.fail("preprocess.interpolation", "is '" + m_.preprocess.interpolation + "'; valid: bicubic, bilinear");
    if (m_.preprocess.resize_size < m_.input_size)
      throw F.fail("preprocess.resize_size", "is smaller than input_size");
  }
  F.triple(j, "mean", m_.mean, false);
  F.triple(j, "std", m_.std, true);
  m_.logit_scale = F.number(j, "logit_scale", "logit_scale");
  const json& dims = F.object(j, "dims", "dims");
  std::vector<std::string> need = {"H", "W", "C", "h", "w", m_.text_input() ? "D" : "K"};
  for (const auto& k : need) m_.dims[k] = F.integer(dims, k, "dims." + k);
  if (m_.dims["H"] != m_.input_size || m_.dims["W"] != m_.input_size)
    throw F.fail("dims.H", "and dims.W must equal input_size " + std::to_string(m_.input_size));
  const json& graphs = F.object(j, "graphs", "graphs");
  for (auto it = graphs.begin(); it != graphs.end(); ++it) {
    std::string g = "graphs." + it.key();
    GraphEntry e;
    e.file = F.str(it.value(), "file", g + ".file");
    e.sha256 = F.str(it.value(), "sha256", g + ".sha256");
    if (!is_hex64(e.sha256)) throw F.fail(g + ".sha256", "must be 64 hex digits");
    const json& ins = F.get(it.value(), "inputs", g + ".inputs");
    if (!ins.is_array()) throw F.fail(g + ".inputs", "must be a list");
    for (const auto& t : ins) e.input_names.push_back(F.str(t, "name", g + ".inputs[].name"));
    m_.graphs[it.key()] = e;
  }
  const json& sets = F.object(j, "class_sets", "class_sets");
  for (auto it = sets.begin(); it != sets.end(); ++it) {
    std::string c = "class_sets." + it.key();
    ClassSetEntry e;
    e.labels = F.str(it.value(), "labels", c + ".labels");
    e.count = F.integer(it.value(), "count", c + ".count");
    if (m_.text_input()) {
      e.embeddings = F.str(it.value(), "embeddings", c + ".embeddings");
      if (it.value().contains("sha256")) e.sha256 = F.str(it.value(), "sha256", c + ".sha256");
    }
    m_.class_sets[it.key()] = e;
  }
  m_.default_class_set = F.str(j, "default_class_set", "default_class_set");
  if (!m_.class_sets.count(m_.default_class_set))
    throw F.fail("default_class_set", "names '" + m_.default_class_set + "', which class_sets does not list");
  if (j.contains("random_weights") && j["random_weights"].is_boolean()) m_.random_weights = j["random_weights"].get<bool>();
}

std::vector<std::string> Artifacts::expected_inputs(const std::string& graph) const {
  std::vector<std::string> in = {graph == "head" || graph == "head_grad" ? "activations" : "image"};
  if (m_.text_input()) in.push_back("text");
  if (graph == "explain" || graph == "head_grad") in.push_back("target");
  return in;
}

std::vector<Artifacts::Tensor> Artifacts::expected_io(const std::string& graph, bool outputs) const {
  const std::string classes = m_.text_input() ? "L" : "K";
  const Tensor image{"image", {"batch", "3", "H", "W"}}, text{"text", {"L", "D"}}, target{"target", {"batch"}},
      logits{"logits", {"batch", classes}}, acts{"activations", {"batch", "C", "h", "w"}},
      grads{"gradients", {"batch", "C", "h", "w"}};
  std::vector<Tensor> io;
  if (outputs) {
    io.push_back(logits);
    if (graph == "explain" || graph == "features") io.push_back(acts);
    if (graph == "explain" || graph == "head_grad") io.push_back(grads);
    return io;
  }
  io.push_back(graph == "head" || graph == "head_grad" ? acts : image);
  if (m_.text_input()) io.push_back(text);
  if (graph == "explain" || graph == "head_grad") io.push_back(target);
  return io;
}

std::string Artifacts::check_graph(const std::string& name, bool verify) const {
  auto it = m_.graphs.find(name);
  if (it == m_.graphs.end()) throw ArtifactsError(mpath_ + ": no '" + name + "' graph listed; re-export with this version");
  std::string path = dir_ + "/" + it->second.file;
  if (!is_file(path)) throw ArtifactsError(path + ": graph file missing");
  if (it->second.input_names != expected_inputs(name))
    throw ArtifactsError(path + ": graph inputs differ from this consumer's contract (family " + m_.family + "); re-export");
  if (verify) {
    std::string digest = sha256_file(path);
    if (digest != it->second.sha256)
      throw ArtifactsError(path + ": sha256 " + digest.substr(0, 12) + "... does not match the manifest's " +
                           it->second.sha256.substr(0, 12) + "...; the graph was modified or belongs to another export");
  }
  return path;
}

ClassSet Artifacts::load_class_set(const std::string& name) const {
  std::string key = name.empty() ? m_.default_class_set : name;
  auto it = m_.class_sets.find(key);
  if (it == m_.class_sets.end()) {
    std::string avail;
    for (const auto& kv : m_.class_sets) avail += (avail.empty() ? "" : ", ") + kv.first;
    throw ArtifactsError(mpath_ + ": no class set '" + key + "'; available: " + avail);
  }
  ClassSet cs;
  cs.name = key;
  std::string lab = dir_ + "/" + it->second.labels;
  std::ifstream f(lab);
  if (!f) throw ArtifactsError(lab + ": class set file missing");
  for (std::string line; std::getline(f, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) cs.labels.push_back(line);
  }
  int n = int(cs.labels.size());
  if (!m_.text_input()) {
    if (n != m_.dims.at("K"))
      throw ArtifactsError(lab + ": " + std::to_string(n) + " labels for a classifier with " + std::to_string(m_.dims.at("K")) + " classes");
    return cs;
  }
  std::string emb = dir_ + "/" + it->second.embeddings;
  if (!is_file(emb)) throw ArtifactsError(emb + ": class set file missing");
  if (!it->second.sha256.empty() && sha256_file(emb) != it->second.sha256)
    throw ArtifactsError(emb + ": sha256 does not match the manifest; the class set was modified");
  Array a;
  try {
    a = read_npy(emb);
  } catch (const std::runtime_error& e) {
    throw ArtifactsError(e.what());
  }
  int d = m_.dims.at("D");
  if (a.shape.size() != 2 || a.shape[0] != n || a.shape[1] != d)
    throw ArtifactsError(emb + ": embeddings have " + std::to_string(a.shape.size()) + " dims / wrong shape, expected (" +
                         std::to_string(n) + ", " + std::to_string(d) + ")");
  cs.embeddings = std::move(a.data);
  return cs;
}

}  // namespace decomcam

// decomcam-cpp: explain images with Decom-CAM from an artifacts folder (graphs + manifest.json).
//
//   decomcam-cpp --artifacts DIR [--method decomcam|decomcam-ig] [--ig-steps M] [--target NAME|INDEX]
//                [--top-p P] [--class-set NAME] [--threads N] [--save-input] --out OUT INPUT [INPUT ...]
//
// --method decomcam (default) is the paper's Decom-CAM; decomcam-ig the decomposition of path-integrated
// evidence (docs/method.md: features.onnx, M head_grad.onnx passes, default 16, 1..1024; an export without
// features.onnx or head_grad.onnx is a usage error: re-export). --ig-steps is checked with either method and
// used by decomcam-ig only.
//
// INPUT is an image file (decoded and preprocessed as the Python runtime does: Pillow's resampling,
// reproduced bit-exactly) or a preprocessed tensor `.npy` [3, S, S] / [1, 3, S, S] float32. For each
// input it writes OUT/<stem>.saliency.npy [S, S], <stem>.components.npy [p, S, S], <stem>.weights.npy [p]
// and <stem>.overlay.png (and <stem>.input.npy, the model input, with --save-input), and prints one JSON
// line. Exit status: 0 all inputs explained, 1 some failed (one line each on stderr; the others are still
// explained), 2 usage error (bad option, unknown target, missing/malformed manifest, tampered graph).
#include <algorithm>
#include <chrono>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <sys/stat.h>

#include "explainer.hpp"
#include "names.hpp"
#include "images.hpp"
#include "npy.hpp"

using namespace decomcam;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

const char* kUsage =
    "usage: decomcam-cpp --artifacts DIR [--method decomcam|decomcam-ig] [--ig-steps M] "
    "[--target NAME|INDEX] "
    "[--top-p P] [--class-set NAME] [--threads N] [--save-input] --out OUT INPUT [INPUT ...]";

struct Args {
  std::string artifacts, out, target, class_set, method = "decomcam";
  int top_p = 10, threads = 0, ig_steps = 16;
  bool save_input = false;
  std::vector<std::string> inputs;
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::cerr << "decomcam-cpp: " << msg << "\n" << kUsage << std::endl;
  std::exit(2);
}

int to_int(const std::string& opt, const std::string& v) {
  try {
    size_t pos;
    int i = std::stoi(v, &pos);
    if (pos == v.size()) return i;
  } catch (const std::exception&) {
  }
  usage_error(opt + " needs an integer, got '" + v + "'");
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(s + " needs a value");
      return argv[++i];
    };
    if (s == "--artifacts") a.artifacts = value();
    else if (s == "--out") a.out = value();
    else if (s == "--target") a.target = value();
    else if (s == "--class-set") a.class_set = value();
    else if (s == "--top-p") a.top_p = to_int(s, value());
    else if (s == "--method") a.method = value();
    else if (s == "--ig-steps") a.ig_steps = to_int(s, value());
    else if (s == "--threads") a.threads = to_int(s, value());
    else if (s == "--save-input") a.save_input = true;
    else if (s == "-h" || s == "--help") {
      std::cout << kUsage << std::endl;
      std::exit(0);
    } else if (s.size() > 1 && s[0] == '-' && s.rfind("--", 0) == 0) usage_error("unknown option " + s);
    else a.inputs.push_back(s);
  }
  if (a.artifacts.empty()) usage_error("--artifacts DIR is required");
  if (a.out.empty()) usage_error("--out OUT is required");
  if (a.inputs.empty()) usage_error("no input images");
  if (a.top_p < 1) usage_error("--top-p must be >= 1");
  if (a.method != "decomcam" && a.method != "decomcam-ig")
    usage_error("unknown method '" + a.method + "'; valid: decomcam, decomcam-ig");
  if (a.ig_steps < 1 || a.ig_steps > 1024) usage_error("--ig-steps must be in 1..1024");
  if (a.threads < 0) usage_error("--threads must be >= 0");
  return a;
}

std::string stem_of(const std::string& path) {
  std::string base = path.substr(path.find_last_of('/') + 1);
  size_t dot = base.find_last_of('.');
  return dot == std::string::npos || dot == 0 ? base : base.substr(0, dot);
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// The saliency as a jet heat map blended over the image (uint8 RGB), titled "METHOD: TARGET".
std::string overlay_png(const cv::Mat& rgb, const cv::Mat& sal, const std::string& title, bool random_weights) {
  cv::Mat u8, heat, heat_rgb, img;
  sal.convertTo(u8, CV_8U, 255.0);
  cv::applyColorMap(u8, heat, cv::COLORMAP_JET);
  cv::cvtColor(heat, heat_rgb, cv::COLOR_BGR2RGB);
  cv::addWeighted(rgb, 0.5, heat_rgb, 0.5, 0.0, img);
  double scale = std::max(0.35, img.cols / 700.0);
  int thick = std::max(1, int(std::lround(scale * 1.5)));
  std::string text = title + (random_weights ? " (RANDOM WEIGHTS)" : "");
  int base = 0;
  cv::Size ts = cv::getTextSize(text, cv::FONT_HERSHEY_SIMPLEX, scale, thick, &base);
  cv::rectangle(img, {0, 0}, {std::min(img.cols, ts.width + 8), ts.height + base + 6}, {0, 0, 0}, -1);
  cv::putText(img, text, {4, ts.height + 3}, cv::FONT_HERSHEY_SIMPLEX, scale, {255, 255, 255}, thick, cv::LINE_AA);
  cv::Mat bgr;
  cv::cvtColor(img, bgr, cv::COLOR_RGB2BGR);
  std::vector<uchar> buf;
  if (!cv::imencode(".png", bgr, buf)) throw std::runtime_error("PNG encoding failed");
  return std::string(buf.begin(), buf.end());
}

// One input -> its outputs and JSON line; throws ImageError / std::runtime_error with a one-line message.
json explain_one(Explainer& ex, const Args& a, const std::string& input, int target) {
  const Manifest& m = ex.artifacts().manifest();
  const int s = m.input_size;
  const size_t plane = size_t(s) * s;
  std::vector<std::pair<std::string, double>> pre_t;
  auto t = Clock::now();
  std::vector<float> x;
  cv::Mat rgb;  // what the overlay is drawn on
  Geometry geo;
  bool from_tensor = ends_with(input, ".npy");
  if (from_tensor) {
    Array arr;
    try {
      arr = read_npy(input);
    } catch (const std::runtime_error& e) {
      throw ImageError(e.what());
    }
    std::vector<int64_t> want3 = {3, s, s}, want4 = {1, 3, s, s};
    if (arr.shape != want3 && arr.shape != want4)
      throw ImageError(show(input) + ": tensor shape does not match the model input [3, " + std::to_string(s) + ", " +
                       std::to_string(s) + "]");
    x = std::move(arr.data);
    pre_t.push_back({"load", std::chrono::duration<double>(Clock::now() - t).count()});
    rgb.create(s, s, CV_8UC3);
    for (size_t j = 0; j < plane; ++j)
      for (int c = 0; c < 3; ++c) {
        float v = std::min(std::max(x[c * plane + j] * m.std[c] + m.mean[c], 0.0f), 1.0f);
        rgb.ptr<uint8_t>()[3 * j + c] = cv::saturate_cast<uint8_t>(v * 255.0f);
      }
    geo = Geometry{s, s, s, "stretch", s, s, 0, 0};
  } else {
    rgb = load_image(input);
    pre_t.push_back({"load", std::chrono::duration<double>(Clock::now() - t).count()});
    t = Clock::now();
    x = preprocess(rgb, m, &geo);
    pre_t.push_back({"preprocess", std::chrono::duration<double>(Clock::now() - t).count()});
  }
  Explanation e = ex.explain(x, target, a.top_p);

  t = Clock::now();
  const std::string base = a.out + "/" + stem_of(input);
  std::vector<float> wts(e.weights.begin(), e.weights.end());
  cv::Mat sal(s, s, CV_32F, e.saliency.data());
  write_file_atomic(base + ".saliency.npy", npy_bytes(e.saliency.data(), {s, s}));
  write_file_atomic(base + ".components.npy", npy_bytes(e.components.data(), {e.p, s, s}));
  write_file_atomic(base + ".weights.npy", npy_bytes(wts.data(), {e.p}));
  if (a.save_input) write_file_atomic(base + ".input.npy", npy_bytes(x.data(), {3, s, s}));
  write_file_atomic(base + ".overlay.png",
                    overlay_png(rgb, geo.to_original(sal), a.method + ": " + e.target_name, m.random_weights));
  double write_s = std::chrono::duration<double>(Clock::now() - t).count();

  json top5 = json::array();
  for (auto& [name, prob] : e.top5) top5.push_back({{"class", name}, {"probability", prob}});
  json timings = json::object();
  for (auto& [k, v] : pre_t) timings[k] = 1e3 * v;
  for (auto& [k, v] : e.timings) timings[k] = 1e3 * v;
  timings["write"] = 1e3 * write_s;
  return {{"source", input},
          {"input", from_tensor ? "tensor" : "image"},
          {"method", a.method},
          {"target", {{"index", e.target}, {"name", e.target_name}}},
          {"top5", top5},
          {"weights", e.weights},
          {"scores", e.scores.empty() ? json(nullptr) : json(e.scores)},  // decomcam-ig measures no gains
          {"explained_variance", e.explained_variance},
          {"singular_values", e.singular_values},
          {"input_size", s},
          {"original_size", {geo.orig_h, geo.orig_w}},
          {"timings_ms", timings},
          {"random_weights", m.random_weights}};
}

}  // namespace

int main(int argc, char** argv) {
  Args a = parse(argc, argv);
  std::unique_ptr<Explainer> ex;
  int target = -1;
  try {
    ex = std::make_unique<Explainer>(a.artifacts, a.class_set, true, a.threads, 32, a.method, a.ig_steps);
    target = ex->resolve_target(a.target);
  } catch (const std::exception& e) {  // ArtifactsError, TargetError
    std::cerr << one_line(e.what()) << std::endl;
    return 2;
  }
  struct stat st;
  if (stat(a.out.c_str(), &st) != 0 && mkdir(a.out.c_str(), 0777) != 0) {
    std::cerr << a.out << ": cannot create the output folder" << std::endl;
    return 2;
  }
  int failed = 0;
  for (const auto& input : a.inputs) {
    try {
      json line = explain_one(*ex, a, input, target);
      std::cout << line.dump() << std::endl;
    } catch (const std::exception& e) {
      std::string msg = e.what();
      const std::string name = show(input);
      if (msg.rfind(name + ": ", 0) != 0) msg = name + ": " + msg;  // every line names the input, quoted
      std::cerr << one_line(msg) << std::endl;                   // one problem, one line
      ++failed;
    }
  }
  return failed ? 1 : 0;
}

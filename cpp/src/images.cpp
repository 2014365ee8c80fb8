// Decoding, Pillow-exact resizing and normalisation (the C++ side of runtime/images.py).
#include "images.hpp"

#include "names.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

namespace decomcam {
namespace {

constexpr int kAlphaBackground = 128;
constexpr int kPrecisionBits = 22;  // Pillow's fixed-point weight precision for 8-bit images

ImageError fail(const std::string& path, const std::string& problem) { return ImageError(show(path) + ": " + problem); }

uint32_t be16(const std::string& d, size_t i) { return (uint32_t(uint8_t(d[i])) << 8) | uint8_t(d[i + 1]); }
uint32_t be32(const std::string& d, size_t i) { return (be16(d, i) << 16) | be16(d, i + 2); }
uint32_t le16(const std::string& d, size_t i) { return (uint32_t(uint8_t(d[i + 1])) << 8) | uint8_t(d[i]); }
uint32_t le32(const std::string& d, size_t i) { return (le16(d, i + 2) << 16) | le16(d, i); }

// (width, height) from the header of a PNG, JPEG, GIF, BMP, WebP or TIFF file, without decoding anything;
// false when the format is not one of these or the header cannot be read (OpenCV then decides).
bool header_size(const std::string& d, long long* w, long long* h) {
  const size_t n = d.size();
  if (n >= 24 && d.compare(0, 8, std::string("\x89PNG\r\n\x1a\n", 8)) == 0 && d.compare(12, 4, "IHDR") == 0) {
    *w = be32(d, 16), *h = be32(d, 20);
    return true;
  }
  if (n >= 10 && (d.compare(0, 6, "GIF87a") == 0 || d.compare(0, 6, "GIF89a") == 0)) {
    *w = le16(d, 6), *h = le16(d, 8);
    return true;
  }
  if (n >= 26 && d.compare(0, 2, "BM") == 0) {
    uint32_t hdr = le32(d, 14);
    if (hdr == 12) {
      *w = le16(d, 18), *h = le16(d, 20);
    } else {
      *w = int32_t(le32(d, 18)), *h = int32_t(le32(d, 22));
      *w = *w < 0 ? -*w : *w;
      *h = *h < 0 ? -*h : *h;
    }
    return true;
  }
  if (n >= 30 && d.compare(0, 4, "RIFF") == 0 && d.compare(8, 4, "WEBP") == 0) {
    if (d.compare(12, 4, "VP8 ") == 0 && n >= 30) {
      *w = le16(d, 26) & 0x3fff, *h = le16(d, 28) & 0x3fff;
      return true;
    }
    if (d.compare(12, 4, "VP8L") == 0 && n >= 25) {
      uint32_t b = le32(d, 21);
      *w = (b & 0x3fff) + 1, *h = ((b >> 14) & 0x3fff) + 1;
      return true;
    }
    if (d.compare(12, 4, "VP8X") == 0 && n >= 30) {
      *w = (le32(d, 24) & 0xffffff) + 1, *h = (le32(d, 27) & 0xffffff) + 1;
      return true;
    }
    return false;
  }
  if (n >= 4 && uint8_t(d[0]) == 0xff && uint8_t(d[1]) == 0xd8) {  // JPEG: the first SOF segment
    size_t i = 2;
    while (i + 9 < n) {
      if (uint8_t(d[i]) != 0xff) return false;
      uint8_t m = uint8_t(d[i + 1]);
      if (m == 0xff) { ++i; continue; }
      if (m == 0xd8 || m == 0x01 || (m >= 0xd0 && m <= 0xd7)) { i += 2; continue; }
      if (m >= 0xc0 && m <= 0xcf && m != 0xc4 && m != 0xc8 && m != 0xcc) {
        *h = be16(d, i + 5), *w = be16(d, i + 7);
        return true;
      }
      if (m == 0xda || m == 0xd9) return false;
      i += 2 + be16(d, i + 2);
    }
    return false;
  }
  if (n >= 8 && (d.compare(0, 4, std::string("II*\0", 4)) == 0 || d.compare(0, 4, std::string("MM\0*", 4)) == 0)) {
    const bool le = d[0] == 'I';
    auto u16 = [&](size_t i) { return le ? le16(d, i) : be16(d, i); };
    auto u32 = [&](size_t i) { return le ? le32(d, i) : be32(d, i); };
    size_t ifd = u32(4);
    if (ifd + 2 > n) return false;
    uint32_t count = u16(ifd);
    long long ww = -1, hh = -1;
    for (uint32_t k = 0; k < count && ifd + 2 + 12 * (k + 1) <= n; ++k) {
      size_t e = ifd + 2 + 12 * k;
      uint32_t tag = u16(e), type = u16(e + 2);
      uint32_t v = type == 3 ? u16(e + 8) : u32(e + 8);
      if (tag == 256) ww = v;
      if (tag == 257) hh = v;
    }
    if (ww < 0 || hh < 0) return false;
    *w = ww, *h = hh;
    return true;
  }
  return false;
}

// Why a PNG or JPEG stream is incomplete, or "".
std::string truncation(const std::string& data) {
  static const std::string png_magic("\x89PNG\r\n\x1a\n", 8);
  if (data.compare(0, 8, png_magic) == 0) {  // walk the chunks to IEND
    size_t pos = 8;
    while (pos + 8 <= data.size()) {
      uint32_t len = (uint32_t(uint8_t(data[pos])) << 24) | (uint32_t(uint8_t(data[pos + 1])) << 16) |
                     (uint32_t(uint8_t(data[pos + 2])) << 8) | uint8_t(data[pos + 3]);
      if (data.compare(pos + 4, 4, "IEND") == 0) return "";
      pos += 12 + size_t(len);
    }
    return "truncated (PNG has no IEND chunk)";
  }
  if (data.size() >= 3 && uint8_t(data[0]) == 0xff && uint8_t(data[1]) == 0xd8 && uint8_t(data[2]) == 0xff) {
    size_t eoi = data.rfind("\xff\xd9"), sos = data.rfind("\xff\xda");
    long long e = eoi == std::string::npos ? -1 : (long long)eoi, s = sos == std::string::npos ? -1 : (long long)sos;
    if (e < s) return "truncated (JPEG has no end-of-image marker after its last scan)";
  }
  return "";
}

// Pillow's filters: bicubic (Keys, a = -0.5) and bilinear (triangle), with their support.
double bicubic(double x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}
double bilinear(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

struct Weights {
  std::vector<int> start, taps;   // per output: first input index, number of inputs read
  std::vector<int32_t> w;         // [count, max_taps] in units of 2^-22
  int max_taps = 0;
};

// Weights of outputs first .. first+count-1 of an in_size -> out_size resize (precompute_coeffs +
// normalize_coeffs_8bpc).
Weights pillow_weights(int in_size, int out_size, int first, int count, const std::string& interpolation) {
  bool cubic = interpolation == "bicubic";
  double scale = double(in_size) / out_size;
  double filterscale = std::max(scale, 1.0);
  double support = (cubic ? 2.0 : 1.0) * filterscale;
  double ss = 1.0 / filterscale;
  Weights W;
  W.max_taps = int(std::ceil(support)) * 2 + 1;
  W.start.resize(count);
  W.taps.resize(count);
  W.w.assign(size_t(count) * W.max_taps, 0);
  std::vector<double> k(W.max_taps);
  for (int o = 0; o < count; ++o) {
    double centre = (first + o + 0.5) * scale;
    int xmin = std::max(int(centre - support + 0.5), 0);
    int xmax = std::min(int(centre + support + 0.5), in_size);
    int n = std::min(xmax - xmin, W.max_taps);
    double total = 0.0;
    for (int x = 0; x < n; ++x) {
      double arg = (x + xmin - centre + 0.5) * ss;
      k[x] = cubic ? bicubic(arg) : bilinear(arg);
      total += k[x];
    }
    for (int x = 0; x < n; ++x) {
      double v = total != 0.0 ? k[x] / total : k[x];
      W.w[size_t(o) * W.max_taps + x] = int32_t(std::trunc(v * (1 << kPrecisionBits) + (v < 0 ? -0.5 : 0.5)));
    }
    W.start[o] = xmin;
    W.taps[o] = n;
  }
  return W;
}

// Silences stderr while alive: libjpeg prints its warnings ("Corrupt JPEG data: ...") there directly,
// and a decode failure is reported once, as the input's one line.
struct MuteStderr {
  int saved = -1;
  MuteStderr() {
    std::fflush(stderr);
    saved = dup(2);
    int devnull = open("/dev/null", O_WRONLY);
    if (saved >= 0 && devnull >= 0) dup2(devnull, 2);
    if (devnull >= 0) close(devnull);
  }
  ~MuteStderr() {
    if (saved >= 0) {
      std::fflush(stderr);
      dup2(saved, 2);
      close(saved);
    }
  }
};

inline uint8_t clip8(int32_t acc) {
  acc = (acc + (1 << (kPrecisionBits - 1))) >> kPrecisionBits;
  return uint8_t(std::min(std::max(acc, 0), 255));
}

}  // namespace

cv::Mat load_image(const std::string& path, long long max_pixels, double max_aspect) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) throw fail(path, "no such file");
  if (S_ISDIR(st.st_mode)) throw fail(path, "is a directory, not an image file");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw fail(path, "cannot read");
  std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (data.empty()) throw fail(path, "empty file (0 bytes)");
  long long hw = 0, hh = 0;
  if (header_size(data, &hw, &hh)) {  // the limits, before anything is decoded
    if (hw * hh > max_pixels)
      throw fail(path, std::to_string(hw) + " x " + std::to_string(hh) + " pixels is over the pixel limit; refused "
                       "before decoding");
    if (hw < 1 || hh < 1) throw fail(path, "corrupt header: size " + std::to_string(hw) + " x " + std::to_string(hh));
    const double ratio = double(std::max(hw, hh)) / double(std::min(hw, hh));
    if (ratio > max_aspect)
      throw fail(path, std::to_string(hw) + " x " + std::to_string(hh) + " pixels: the long side is " +
                       std::to_string((long long)std::llround(ratio)) + " times the short side, over the aspect-ratio "
                       "limit " + std::to_string((long long)max_aspect) + "; refused before decoding");
  }
  std::string why = truncation(data);
  if (!why.empty()) throw fail(path, why);
  cv::Mat buf(1, int(data.size()), CV_8U, data.data());
  cv::Mat img;
  try {
    MuteStderr mute;
    img = cv::imdecode(buf, cv::IMREAD_UNCHANGED);
  } catch (const cv::Exception&) {
    img.release();
  }
  if (img.empty()) throw fail(path, "not an image or corrupt (OpenCV cannot decode it)");
  if ((long long)img.rows * img.cols > max_pixels)
    throw fail(path, std::to_string(img.cols) + " x " + std::to_string(img.rows) + " pixels is over the pixel limit");
  if (double(std::max(img.rows, img.cols)) / std::max(1, std::min(img.rows, img.cols)) > max_aspect)
    throw fail(path, std::to_string(img.cols) + " x " + std::to_string(img.rows) + " pixels: over the aspect-ratio "
                     "limit " + std::to_string((long long)max_aspect));
  int ch = img.channels();
  bool alpha = ch == 2 || ch == 4;
  if (img.depth() == CV_8U && !alpha) {
    cv::Mat bgr;
    {
      MuteStderr mute;
      bgr = cv::imdecode(buf, cv::IMREAD_COLOR);  // applies the EXIF orientation; grey -> 3 channels
    }
    if (bgr.empty()) throw fail(path, "not an image or corrupt (OpenCV cannot decode it)");
    cv::Mat rgb;
    cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
    return rgb;
  }
  double peak = img.depth() == CV_8U ? 255.0 : img.depth() == CV_16U ? 65535.0 : img.depth() == CV_32F ? 1.0 : 0.0;
  if (peak == 0.0) throw fail(path, "unsupported sample type");
  cv::Mat fl;
  img.convertTo(fl, CV_32F, 1.0 / peak);
  std::vector<cv::Mat> planes;
  cv::split(fl, planes);
  std::vector<cv::Mat> colour(planes.begin(), planes.end() - (alpha ? 1 : 0));
  if (alpha) {
    cv::Mat a;
    cv::min(cv::max(planes.back(), 0.0), 1.0, a);
    for (auto& c : colour) c = c.mul(a) + (kAlphaBackground / 255.0f) * (1.0f - a);
  }
  if (colour.size() == 1) colour = {colour[0], colour[0], colour[0]};
  std::swap(colour[0], colour[2]);  // BGR -> RGB
  cv::Mat rgbf, rgb;
  cv::merge(colour, rgbf);
  rgbf.convertTo(rgb, CV_8U, 255.0);  // rounds to nearest, saturates
  return rgb;
}

cv::Mat pillow_resize_crop(const cv::Mat& rgb, int resized_h, int resized_w, int top, int left, int size,
                           const std::string& interpolation) {
  CV_Assert(rgb.type() == CV_8UC3);
  const int h = rgb.rows, w = rgb.cols;
  Weights wv = pillow_weights(h, resized_h, top, size, interpolation);
  Weights wh = pillow_weights(w, resized_w, left, size, interpolation);
  cv::Mat res(size, size, CV_8UC3);
  // Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many pixels as
  // the width (runtime.images.pillow_vertical_first); before, and otherwise, the horizontal pass first.
  const bool vertical_first = resized_h < h && resized_w != w && (h - resized_h) > 2 * (w - resized_w);
  if (vertical_first) {
    int c0 = *std::min_element(wh.start.begin(), wh.start.end()), c1 = 0;
    for (int o = 0; o < size; ++o) c1 = std::max(c1, wh.start[o] + wh.taps[o]);
    // vertical pass over the input columns the horizontal pass reads: tmp [size, c1 - c0, 3]
    cv::Mat tmp(size, c1 - c0, CV_8UC3);
    for (int o = 0; o < size; ++o) {
      const int32_t* k = &wv.w[size_t(o) * wv.max_taps];
      uint8_t* out = tmp.ptr<uint8_t>(o);
      for (int x = 3 * c0; x < 3 * c1; ++x) {
        int32_t acc = 0;
        for (int t = 0; t < wv.taps[o]; ++t) acc += k[t] * rgb.ptr<uint8_t>(wv.start[o] + t)[x];
        out[x - 3 * c0] = clip8(acc);
      }
    }
    // horizontal pass: [size, size, 3]
    for (int r = 0; r < size; ++r) {
      const uint8_t* in = tmp.ptr<uint8_t>(r);
      uint8_t* out = res.ptr<uint8_t>(r);
      for (int o = 0; o < size; ++o) {
        const int32_t* k = &wh.w[size_t(o) * wh.max_taps];
        int32_t acc[3] = {0, 0, 0};
        for (int t = 0; t < wh.taps[o]; ++t) {
          const uint8_t* px = in + 3 * (wh.start[o] + t - c0);
          acc[0] += k[t] * px[0];
          acc[1] += k[t] * px[1];
          acc[2] += k[t] * px[2];
        }
        for (int c = 0; c < 3; ++c) out[3 * o + c] = clip8(acc[c]);
      }
    }
    return res;
  }
  int r0 = *std::min_element(wv.start.begin(), wv.start.end()), r1 = 0;
  for (int o = 0; o < size; ++o) r1 = std::max(r1, wv.start[o] + wv.taps[o]);
  // horizontal pass over the input rows the vertical pass reads: tmp [r1 - r0, size, 3]
  cv::Mat tmp(r1 - r0, size, CV_8UC3);
  for (int r = r0; r < r1; ++r) {
    const uint8_t* in = rgb.ptr<uint8_t>(r);
    uint8_t* out = tmp.ptr<uint8_t>(r - r0);
    for (int o = 0; o < size; ++o) {
      const int32_t* k = &wh.w[size_t(o) * wh.max_taps];
      int32_t acc[3] = {0, 0, 0};
      for (int t = 0; t < wh.taps[o]; ++t) {
        const uint8_t* px = in + 3 * (wh.start[o] + t);
        acc[0] += k[t] * px[0];
        acc[1] += k[t] * px[1];
        acc[2] += k[t] * px[2];
      }
      for (int c = 0; c < 3; ++c) out[3 * o + c] = clip8(acc[c]);
    }
  }
  // vertical pass: [size, size, 3]
  for (int o = 0; o < size; ++o) {
    const int32_t* k = &wv.w[size_t(o) * wv.max_taps];
    uint8_t* out = res.ptr<uint8_t>(o);
    for (int x = 0; x < 3 * size; ++x) {
      int32_t acc = 0;
      for (int t = 0; t < wv.taps[o]; ++t) acc += k[t] * tmp.ptr<uint8_t>(wv.start[o] + t - r0)[x];
      out[x] = clip8(acc);
    }
  }
  return res;
}

cv::Mat Geometry::to_original(const cv::Mat& map) const {
  cv::Mat src = map;
  if (mode == "crop") {
    cv::Mat canvas = cv::Mat::zeros(resized_h, resized_w, CV_32F);
    map.copyTo(canvas(cv::Rect(crop_left, crop_top, size, size)));
    src = canvas;
  }
  cv::Mat out;
  cv::resize(src, out, cv::Size(orig_w, orig_h), 0, 0, cv::INTER_LINEAR);
  return out;
}

std::vector<float> preprocess(const cv::Mat& rgb, const Manifest& m, Geometry* geometry) {
  const int size = m.input_size, shortest = m.preprocess.resize_size;
  const int h = rgb.rows, w = rgb.cols;
  int rh, rw, top = 0, left = 0;
  if (m.preprocess.resize == "crop") {  // torchvision Resize(shortest) + CenterCrop(size)
    if (w <= h) {
      rh = int(double(shortest) * h / w);
      rw = shortest;
    } else {
      rh = shortest;
      rw = int(double(shortest) * w / h);
    }
    top = int(std::nearbyint((rh - size) / 2.0));  // Python's round(): half to even
    left = int(std::nearbyint((rw - size) / 2.0));
  } else {
    rh = rw = size;
  }
  cv::Mat px = pillow_resize_crop(rgb, rh, rw, top, left, size, m.preprocess.interpolation);
  std::vector<float> x(size_t(3) * size * size);
  const size_t plane = size_t(size) * size;
  for (int i = 0; i < size; ++i) {
    const uint8_t* row = px.ptr<uint8_t>(i);
    for (int j = 0; j < size; ++j)
      for (int c = 0; c < 3; ++c)
        x[c * plane + size_t(i) * size + j] = (float(row[3 * j + c]) / 255.0f - m.mean[c]) / m.std[c];
  }
  if (geometry) *geometry = Geometry{h, w, size, m.preprocess.resize, rh, rw, top, left};
  return x;
}

}  // namespace decomcam

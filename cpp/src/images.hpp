// Image input: decode files to uint8 RGB, preprocess exactly as runtime/images.py (Pillow's resampling),
// and map a model-input map back to the original image.
#pragma once
#include <opencv2/core.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "artifacts.hpp"

namespace decomcam {

// An image file that cannot be used; what() is one line, "PATH: problem".
struct ImageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Decode a file to uint8 RGB [H, W, 3] (CV_8UC3, RGB order), as runtime.images.load_image: grey becomes 3
// channels, 16-bit samples round(v / 257), alpha composited over grey 128, a PNG without IEND or a JPEG
// without EOI after its last scan is refused as truncated, EXIF orientation is applied (by OpenCV, for
// 8-bit images without alpha). The size is read from the header first (PNG, JPEG, GIF, BMP, WebP, TIFF):
// more than max_pixels pixels, or a long side more than max_aspect times the short side, is refused before
// decoding (runtime/images.py's limits, which bound the memory of the resize).
cv::Mat load_image(const std::string& path, long long max_pixels = 64000000LL, double max_aspect = 64.0);

// Pillow's Image.resize(resized_wh, BICUBIC|BILINEAR) followed by a crop of size x size at (top, left),
// bit-exact (Resample.c: separable, kernel widened by the scale when downscaling, 22-bit fixed-point
// weights, horizontal pass first, uint8 rounding after each pass). rgb: CV_8UC3.
cv::Mat pillow_resize_crop(const cv::Mat& rgb, int resized_h, int resized_w, int top, int left, int size,
                           const std::string& interpolation);

// How a model-input pixel maps back to the original image.
struct Geometry {
  int orig_h = 0, orig_w = 0, size = 0;
  std::string mode = "crop";
  int resized_h = 0, resized_w = 0, crop_top = 0, crop_left = 0;
  // map [S, S] float32 -> [orig_h, orig_w] (crop: placed at its offset in the resized image, zeros
  // elsewhere, then bilinear to the original size), as runtime.images.Geometry.to_original.
  cv::Mat to_original(const cv::Mat& map) const;
};

// uint8 RGB -> x [3, S, S] float32 normalised with the manifest's mean/std, following its preprocess policy.
std::vector<float> preprocess(const cv::Mat& rgb, const Manifest& m, Geometry* geometry);

}  // namespace decomcam

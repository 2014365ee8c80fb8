// NumPy .npy files (format 1.0/2.0, little-endian, C order): read float32/float64 arrays, write float32.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace decomcam {

struct Array {
  std::vector<int64_t> shape;
  std::vector<float> data;  // C order, float32 (float64 files are converted)
  int64_t size() const;
};

// Read a .npy file; throws std::runtime_error("PATH: problem") for a missing, malformed or unsupported file.
Array read_npy(const std::string& path);

// The bytes of a .npy file holding float32 `data` with `shape`.
std::string npy_bytes(const float* data, const std::vector<int64_t>& shape);

// Write `bytes` to PATH.tmp, then rename it to PATH (no half-written file on failure).
void write_file_atomic(const std::string& path, const std::string& bytes);

}  // namespace decomcam

// .npy reading and writing (the subset the artifacts and the outputs use).
#include "npy.hpp"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>
#include <stdexcept>

namespace decomcam {

int64_t Array::size() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

Array read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": no such file or not readable");
  std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto bad = [&](const std::string& why) { return std::runtime_error(path + ": not a usable .npy file (" + why + ")"); };
  if (all.size() < 10 || all.compare(0, 6, "\x93NUMPY") != 0) throw bad("no .npy magic");
  int major = uint8_t(all[6]);
  size_t hlen, off;
  if (major == 1) {
    hlen = uint8_t(all[8]) | (size_t(uint8_t(all[9])) << 8);
    off = 10;
  } else if (major == 2 || major == 3) {
    if (all.size() < 12) throw bad("truncated header");
    hlen = 0;
    for (int i = 0; i < 4; ++i) hlen |= size_t(uint8_t(all[8 + i])) << (8 * i);
    off = 12;
  } else {
    throw bad("format version " + std::to_string(major));
  }
  if (all.size() < off + hlen) throw bad("truncated header");
  std::string header = all.substr(off, hlen);
  std::smatch m;
  if (!std::regex_search(header, m, std::regex("'descr':\\s*'([<>|=]?)([fi])(\\d)'"))) throw bad("no dtype");
  std::string kind = m[2].str() + m[3].str();
  if (m[1].str() == ">") throw bad("big-endian data");
  if (kind != "f4" && kind != "f8") throw bad("dtype " + kind + ", expected float32 or float64");
  if (std::regex_search(header, std::regex("'fortran_order':\\s*True"))) throw bad("Fortran order");
  if (!std::regex_search(header, m, std::regex("'shape':\\s*\\(([^)]*)\\)"))) throw bad("no shape");
  Array a;
  std::string dims = m[1].str();
  std::regex num("\\d+");
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), num); it != std::sregex_iterator(); ++it)
    a.shape.push_back(std::stoll(it->str()));
  size_t n = size_t(a.size());
  size_t item = kind == "f4" ? 4 : 8;
  size_t start = off + hlen;
  if (all.size() != start + n * item) throw bad("data size does not match the shape");
  a.data.resize(n);
  if (kind == "f4") {
    std::memcpy(a.data.data(), all.data() + start, n * 4);
  } else {
    for (size_t i = 0; i < n; ++i) {
      double v;
      std::memcpy(&v, all.data() + start + 8 * i, 8);
      a.data[i] = float(v);
    }
  }
  return a;
}

std::string npy_bytes(const float* data, const std::vector<int64_t>& shape) {
  std::ostringstream dims;
  int64_t n = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims << shape[i] << (shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
    n *= shape[i];
  }
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims.str() + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(char(header.size() & 0xff));
  out.push_back(char(header.size() >> 8));
  out += header;
  out.append(reinterpret_cast<const char*>(data), size_t(n) * 4);
  return out;
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw std::runtime_error(path + ": cannot write");
    f.write(bytes.data(), std::streamsize(bytes.size()));
    if (!f) {
      std::remove(tmp.c_str());
      throw std::runtime_error(path + ": write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename the temporary file into place");
  }
}

}  // namespace decomcam

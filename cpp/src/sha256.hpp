// SHA-256 of a file (FIPS 180-4), to check a graph against the manifest before it is loaded.
#pragma once
#include <string>

namespace decomcam {

// Lower-case hex digest of the file's bytes; throws std::runtime_error when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace decomcam

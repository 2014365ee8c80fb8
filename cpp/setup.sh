#!/usr/bin/env bash
# Build dependencies of the C++ consumer, then the consumer itself (idempotent; fast when up to date).
#
#   bash cpp/setup.sh [PYTHON]      PYTHON: an interpreter with the `onnxruntime` wheel (default: .venv/bin/python)
#
# ONNX Runtime: Debian 12 has no package. The C/C++ headers come from Debian 13's `libonnxruntime-dev`,
# fetched with apt-get from a private, trixie-only package list under cpp/build/ (the system's apt
# configuration is not touched; the mirror is the one this system already uses, the signature is
# checked with the system's debian-archive-keyring). The library is the PyPI wheel's
# onnxruntime/capi/libonnxruntime.so.1.*: ORT's C API is versioned (OrtGetApiBase()->GetApi(N)), so
# headers of an older release compile and run against a newer library. A `libonnxruntime.so` symlink
# next to the headers lets the linker find it; the program's RUNPATH points at the wheel's folder.
#
# OpenCV (core, imgproc, imgcodecs), Eigen, nlohmann-json, cmake and g++ are Debian 12 packages
# (installed by scripts/setup.sh when run as root, or: apt-get install cmake g++ libopencv-dev
# libeigen3-dev nlohmann-json3-dev).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$root/.venv/bin/python}"
case "$PY" in /*) ;; */*) PY="$(pwd)/$PY" ;; esac   # a relative path, before the cd below
cd "$root/cpp"
ORT_DEB_PACKAGE=libonnxruntime-dev
deps=build/deps
mkdir -p "$deps"

# --- ONNX Runtime headers (Debian 13 package, unpacked under build/deps/ort) -------------------------
if [ ! -f "$deps/ort/include/onnxruntime_cxx_api.h" ]; then
  echo "[cpp/setup] fetching ONNX Runtime headers ($ORT_DEB_PACKAGE from Debian 13)" >&2
  apt_dir="$(pwd)/$deps/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/sources.d"
  # The Debian mirror this system already uses (deb822 or one-line format), suite trixie.
  uri="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -E '/debian/?$' | head -1 || true)"
  [ -n "$uri" ] || uri="$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -E '/debian/?$' | head -1 || true)"
  if [ -z "$uri" ]; then
    echo "cpp/setup.sh: no Debian mirror found in /etc/apt/sources.list*; cannot fetch $ORT_DEB_PACKAGE" >&2
    exit 1
  fi
  printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" > "$apt_dir/sources.d/trixie.sources"
  apt_opts=(-q -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/sources.d"
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
            -o "Dir::State::Status=/dev/null" -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
  apt-get "${apt_opts[@]}" update >/dev/null
  (cd "$apt_dir/archives" && apt-get "${apt_opts[@]}" download "$ORT_DEB_PACKAGE" >/dev/null)
  rm -rf "$deps/ort" "$deps/unpack" && mkdir -p "$deps/unpack" "$deps/ort/lib"
  dpkg-deb -x "$apt_dir/archives/${ORT_DEB_PACKAGE}"_*.deb "$deps/unpack"
  hdr="$(dirname "$(find "$deps/unpack" -name onnxruntime_cxx_api.h | head -1)")"
  mv "$hdr" "$deps/ort/include"
  dpkg-deb -f "$apt_dir/archives/${ORT_DEB_PACKAGE}"_*.deb Version > "$deps/ort/headers-version"
  rm -rf "$deps/unpack"
fi

# --- ONNX Runtime library (the PyPI wheel's) ---------------------------------------------------------
capi="$("$PY" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')"
lib="$(ls "$capi"/libonnxruntime.so.1.* 2>/dev/null | head -1)"
if [ -z "$lib" ]; then
  echo "cpp/setup.sh: $capi has no libonnxruntime.so.1.*; install the onnxruntime wheel (pip install onnxruntime)" >&2
  exit 1
fi
ln -sfn "$lib" "$deps/ort/lib/libonnxruntime.so"
ln -sfn "$lib" "$deps/ort/lib/libonnxruntime.so.1"

# --- the consumer (skipped when the sources, this script and the library are those of the last build) --
stamp=build/.decomcam-cpp-build
want="$(cat CMakeLists.txt src/* setup.sh | sha256sum | cut -c1-16) $lib"
if [ -x build/decomcam-cpp ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DORT_ROOT="$(pwd)/$deps/ort" -DORT_RUNPATH="$capi" >/dev/null
if ! cmake --build build -j "$(nproc)" > build/build.log 2>&1; then
  cat build/build.log >&2
  echo "cpp/setup.sh: the build failed (log above, in cpp/build/build.log)" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "[cpp/setup] built $(pwd)/build/decomcam-cpp (ORT headers $(cat "$deps/ort/headers-version"), library $lib)" >&2

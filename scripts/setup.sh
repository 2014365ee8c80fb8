#!/usr/bin/env bash
# Create .venv and install the project with its cpu, export, dev and ray extras (idempotent, fast when up to
# date); install Debian's chromium + chromium-driver for the HTML report's browser test when they are missing.
# On a GPU machine install '.[cuda,export,dev]' (CUDA 13) or '.[cuda12,export,dev]' instead, never with cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium and chromium-driver (the HTML report test)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
      echo "[setup] warning: could not install chromium; the browser test will be skipped" >&2
    fi
  else
    echo "[setup] note: chromium/chromedriver missing and apt-get unavailable (not root); the browser test will be skipped" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.decomcam-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing dependencies into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # torch and torchvision are pinned as a pair: the local CUDA build that also runs on the CPU.
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[cpu,export,dev,ray]"
  echo "$want" > "$stamp"
fi

# The C++ consumer (cpp/): Debian packages for its build, then the build itself (cpp/setup.sh: ONNX Runtime
# headers from Debian 13, the library from the onnxruntime wheel in .venv). Installing needs root and
# apt-get; elsewhere the packages are named and the build is left to tests/cpp, which skips without a compiler.
cpp_pkgs="cmake g++ libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev libeigen3-dev nlohmann-json3-dev"
missing=""
command -v dpkg-query >/dev/null || cpp_pkgs=""   # not Debian: install the equivalents by hand
for p in $cpp_pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing the C++ build's Debian packages:$missing" >&2
    apt-get update -q >/dev/null || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null \
      || echo "[setup] apt-get could not install:$missing" >&2
  else
    echo "[setup] the C++ consumer needs these Debian packages (not installed, not root):$missing" >&2
  fi
fi
if command -v g++ >/dev/null && command -v cmake >/dev/null; then
  bash cpp/setup.sh .venv/bin/python || echo "[setup] the C++ build failed (above); tests/cpp will fail with it" >&2
fi

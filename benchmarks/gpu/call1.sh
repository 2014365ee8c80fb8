#!/usr/bin/env bash
# Device kit, call 1 (no onnxruntime-gpu needed): install the carried open_clip wheels, stash the first
# onnxruntime-gpu part, export the model (random weights; fp32 and fp16 graphs), check CuPy's numerics
# against numpy/OpenCV (operators, the batched eigh on the device and on the host, the explainer), and
# run the `cupy` tests with DECOMCAM_REQUIRE_GPU=1 (a skip is a failure). Results under $OUT.
source "$(dirname "$0")/kit_env.sh"
log "call 1: model $KIT_MODEL, dry run $KIT_DRY_RUN"
stash_parts
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KIT_TMP/site" \
  .gpukit/wheels/*.whl 2>&1 | tail -3 | tee -a "$LOG" >&2
environment
rc=0
if [ -f "$ART/manifest.json" ]; then
  log "export: $ART exists, kept"
else
  # fp16 graphs too (NAME.fp16.onnx), validated here on ORT-CPU where it can run them; final.sh validates on CUDA
  step export 420 "$PY" -m export --model "$KIT_MODEL" --pretrained none --precision fp16 --out "$ART" \
    --json "$OUT/export.json" || rc=1
fi
xp=cupy; [ "$KIT_DRY_RUN" = 1 ] && xp=fake
step numerics 180 "$PY" -m benchmarks.gpu.numerics --artifacts "$ART" --xp "$xp" --json "$OUT/numerics.json" || rc=1
DECOMCAM_REQUIRE_GPU=1 step tests-cupy 300 "$PY" -m pytest -q -p no:cacheprovider -m cupy tests || rc=1
log "call 1 done: exit $rc$([ "$KIT_DRY_RUN" = 1 ] && echo ' (dry run: the cupy tests fail by design, no GPU)')"
exit $rc

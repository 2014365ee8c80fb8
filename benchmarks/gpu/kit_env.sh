# Sourced by the device kit's scripts: paths, environment, logging, and stashing the carried parts.
#   OUT          folder whose files come back (the device tool sets it; a temp folder in a dry run)
#   KIT_TMP      where the machine keeps the kit between calls while warm (default /tmp/gpukit)
#   KIT_MODEL    the model exported and benchmarked (default RN50, random weights: no network there)
#   KIT_DRY_RUN  1 = on a machine without a GPU: nothing is (un)installed, the numerics use the numpy
#                stand-in for CuPy, and the results prove the kit, not the GPU
#   PYTHON       the interpreter (default python3: the one that holds torch there)
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

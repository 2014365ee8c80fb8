#!/usr/bin/env bash
# The whole kit on this machine, without a GPU: call 1, the stash calls, the last call, in one process
# tree, each with the parts a device call would carry (nothing is (un)installed here). Needs OUT and the
# output of prepare.sh; KIT_MODEL defaults to RN-tiny here (RN50 on a shared CPU takes minutes).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT}"
export KIT_DRY_RUN=1 KIT_MODEL="${KIT_MODEL:-RN-tiny}" KIT_TMP="${KIT_TMP:-$(mktemp -d)/gpukit}"
# small batches here: a dry run proves the scripts, not the speed
export KIT_BATCH="${KIT_BATCH:-1,2}" KIT_EFF_BATCH="${KIT_EFF_BATCH:-1}"
export PYTHON="${PYTHON:-python3}"
# a device call sees only the parts it carries: hide the others from each call
hold=$(mktemp -d)
mv .gpukit/ort/part-* "$hold/"
parts=("$hold"/part-*)
n=${#parts[@]}
run_call() {  # run_call K SCRIPT: with part K in place, OUT/callK as that call's $OUT
  mv "${parts[$1]}" .gpukit/ort/
  OUT="$OUT/call$(($1 + 1))" bash "benchmarks/gpu/$2"
  echo "call $(($1 + 1)) ($2): exit $?"
  mv .gpukit/ort/"$(basename "${parts[$1]}")" "$hold/"
}
trap 'mv "$hold"/part-* .gpukit/ort/ 2>/dev/null' EXIT
run_call 0 call1.sh
for ((i = 1; i < n - 1; i++)); do run_call "$i" stash.sh; done
run_call $((n - 1)) final.sh

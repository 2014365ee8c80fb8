#!/usr/bin/env bash
# Device kit, calls 2..N-1: keep the carried onnxruntime-gpu part under $KIT_TMP (nothing else; fast).
source "$(dirname "$0")/kit_env.sh"
stash_parts

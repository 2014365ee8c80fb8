#!/usr/bin/env bash
# The main job: set up .venv, export RN50 (OpenAI weights, or random weights offline, said plainly),
# and explain samples/scene.jpg into outputs/ (overlay PNG, components PNG, JSON, NPZ).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m export.demo "$@"

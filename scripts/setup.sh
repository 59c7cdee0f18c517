#!/usr/bin/env bash
# Create .venv and install the project. torch is installed first (without a GPU: the pinned, CPU-tested release), so
# the project's own torch requirement installs nothing more. Usage: bash scripts/setup.sh [extras, e.g. dev]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Without a GPU, pin the CPU-tested torch. Set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to fetch the
# small CPU-only wheel instead of PyPI's default (CUDA) build.
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.6,<2.15"
  else
    python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
python -m pip install -q -e ".${extras:+[$extras]}"

#!/usr/bin/env bash
# Create .venv (once) with PyTorch, megatron-core (pinned) and this package. Idempotent.
# On GPU clusters install your CUDA build of torch first (and `pip install -e .[gpu]` for
# Transformer Engine); this script never replaces an installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # 2.13.0 is the CPU build available on the project's machines; any torch >= 2.4 works.
  pip install -q "torch==2.13.0" || pip install -q "torch>=2.4"
fi
if ! python -c "import megatron_reft, megatron.core, pytest, wandb" 2>/dev/null; then
  pip install -q -e ".[test]"
fi

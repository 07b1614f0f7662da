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

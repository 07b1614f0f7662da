"""Hub ids for --hf-dir / model.load / data.tokenizer, resolved offline (HF_HUB_OFFLINE=1) from a
cache laid out like huggingface_hub's: models--<owner>--<name>/{refs/<revision>, snapshots/<commit>/}."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conversion_models import random_hf_model, save_hf

from megatron_reft import hub
from megatron_reft.checkpoint import convert
from megatron_reft.config import load_config, resolve_model_config

REPO = Path(__file__).resolve().parents[1]
MAIN, V1 = "a" * 40, "b" * 40


def _add_to_cache(cache: Path, repo: str, source: Path, commit: str, refs: tuple[str, ...]) -> Path:
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    hf_dir = save_hf(random_hf_model("llama_mha"), root / "src", tokenizer=True)
    cache = root / "cache"
    _add_to_cache(cache, "acme/tiny-llama", hf_dir, MAIN, ("main",))
    _add_to_cache(cache, "acme/tiny-llama", hf_dir, V1, ("v1",))
    convert.hf_to_megatron(hf_dir, root / "ckpt", log=lambda *a: None)
    _add_to_cache(cache, "acme/reft-ckpt", root / "ckpt", MAIN, ("main",))
    return cache


@pytest.fixture
def offline(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    assert hub.parse_hub_id("codellama/CodeLlama-7b-hf") == ("codellama/CodeLlama-7b-hf", None)
    assert hub.parse_hub_id("Qwen/Qwen2.5-0.5B@v1.0") == ("Qwen/Qwen2.5-0.5B", "v1.0")
    for not_an_id in ("./a/b", "/abs/path", "a/b/c", "CodeLlama-7b-hf", "runs/x y"):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "local").mkdir(parents=True)
    assert hub.parse_hub_id("acme/local") is None  # an existing local path wins


def test_convert_from_a_cached_hub_id_offline(offline, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for spec, commit in (("acme/tiny-llama", MAIN), ("acme/tiny-llama@v1", V1)):
        out = tmp_path / spec.replace("/", "_")
        proc = subprocess.run([sys.executable, "-m", "megatron_reft.cli", "convert", "hf-to-megatron",
                               "--hf-dir", spec, "--out", str(out)], capture_output=True, text=True, env=env,
                              timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (out / "model.yaml").is_file() and (out / "tokenizer").is_dir()
        assert json.loads((out / "conversion.json").read_text())["source"].endswith(f"snapshots/{commit}")


def test_missing_hub_id_offline_is_one_line_and_writes_nothing(offline, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_reft.cli", "convert", "hf-to-megatron", "--hf-dir",
                           "acme/absent-7b", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--hf-dir: acme/absent-7b is not a local path and not in" in lines[0]
    assert str(offline) in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert not (tmp_path / "out").exists()


def test_tokenizer_and_model_load_hub_ids(offline):
    from megatron_reft.data import load_tokenizer

    config = load_config(None, ["model.load=acme/reft-ckpt", "data.tokenizer=acme/tiny-llama@v1"])
    hub.resolve_config(config)
    assert config.model.load.endswith(f"models--acme--reft-ckpt/snapshots/{MAIN}")
    assert config.data.tokenizer.endswith(f"models--acme--tiny-llama/snapshots/{V1}")
    assert resolve_model_config(config).num_layers == 2
    assert load_tokenizer(config.data.tokenizer).vocab_size == 257


def test_model_load_of_an_hf_model_asks_for_conversion(offline):
    config = load_config(None, ["model.load=acme/tiny-llama"])
    with pytest.raises(hub.HubError, match="is a Hugging Face model, not a megatron-reft checkpoint; convert"):
        hub.resolve_config(config)

"""`megatron-reft convert gguf-to-hf` (issue 9).

- The de-quantised directory of SmolLM2-135M-Instruct (conftest's session fixture, made with
  gguf_to_hf) is the model transformers reads straight from the GGUF file: same config, same
  logits on a real SVAMP prompt, same tokenizer ids and special tokens, and plain float weights
  with tied embeddings (no lm_head tensor, no quantization_config).
- Bad input: a missing file, a non-Llama GGUF file (written here with the gguf package's
  writer) and an existing --out are one-line errors with exit status 2 and nothing written.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from smollm2 import require_real_model, svamp_records


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_reft.cli", "convert", "gguf-to-hf", *args],
                          capture_output=True, text=True, timeout=300)


def test_dequantised_directory_is_the_gguf_model(smollm2):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from megatron_reft.checkpoint.gguf import load_gguf
    from megatron_reft.checkpoint.verify import load_hf_model
    from megatron_reft.data.prompts import build_rl_prompt

    direct, direct_tok = load_gguf(require_real_model())
    saved, saved_tok = load_hf_model(smollm2.hf_dir, torch.float32), AutoTokenizer.from_pretrained(str(smollm2.hf_dir))
    config = json.loads((smollm2.hf_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["rope_parameters"]["rope_theta"] == 1e5
    with safe_open(str(smollm2.hf_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert "lm_head.weight" not in names and f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    prompt = build_rl_prompt(svamp_records("svamp_python_sdp.json", 1, "pcot")[0], "pcot")
    ids = direct_tok(prompt, add_special_tokens=False)["input_ids"]
    assert saved_tok(prompt, add_special_tokens=False)["input_ids"] == ids
    assert (saved_tok.eos_token, saved_tok.eos_token_id, saved_tok.bos_token) == ("<|im_end|>", 2, "<|im_start|>")
    assert saved_tok.decode(ids) == prompt  # byte-level BPE: exact round trip, no dummy prefix
    with torch.no_grad():
        expected = direct(torch.tensor([ids])).logits
        got = saved(torch.tensor([ids])).logits
    # Same weights; the two loads may pick different attention kernels (eager vs sdpa).
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_missing_file_is_one_line_exit_2(tmp_path):
    proc = _convert("--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"megatron-reft convert gguf-to-hf: error: --gguf: {tmp_path / 'nope.gguf'} is not a file"
    assert not (tmp_path / "out").exists()


def test_non_llama_gguf_is_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    proc = _convert("--gguf", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"megatron-reft convert gguf-to-hf: error: {path}: GGUF architecture 'gpt2' is not "
        "Llama-family (supported: llama)"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_existing_output_is_refused(smollm2, tmp_path):
    (tmp_path / "out").mkdir()
    proc = _convert("--gguf", str(require_real_model()), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("exists (pass --overwrite to replace it)")
    assert list((tmp_path / "out").iterdir()) == []

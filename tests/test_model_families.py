"""Model families read from HF configs: Llama-3 RoPE scaling, Mistral's window, Qwen2's Q/K/V
biases, and one-line refusals of what the megatron model cannot represent. (Logits parity for
these families at TP{1,2} x PP{1,2} is in test_conversion_parity.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conversion_models import hf_config

from megatron_reft.checkpoint import hf_llama
from megatron_reft.checkpoint.mapping import UnsupportedConfig


def _hf_dict(name: str) -> dict:
    return hf_config(name).to_dict()


def test_llama3_rope_scaling_is_read_and_matches_transformers_frequencies():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from megatron_reft.models.build import _apply_llama3_rope_scaling

    model = hf_llama.model_config(_hf_dict("llama3"))
    assert model.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    gpt = SimpleNamespace(rotary_pos_emb=RotaryEmbedding(kv_channels=model.head_dim, rotary_percent=1.0,
                                                         rotary_base=model.rope_theta, use_cpu_initialization=True))
    unscaled = gpt.rotary_pos_emb.inv_freq.clone()
    _apply_llama3_rope_scaling(gpt, model)
    theirs = LlamaRotaryEmbedding(hf_config("llama3")).inv_freq
    assert torch.allclose(gpt.rotary_pos_emb.inv_freq, theirs, rtol=1e-6, atol=0)
    # all three bands occur: unchanged (high frequency), divided by the factor, and interpolated
    ratio = unscaled / gpt.rotary_pos_emb.inv_freq
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(8.0)).any()
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_qwen2_has_qkv_bias_and_keeps_tying():
    tied, untied = hf_llama.model_config(_hf_dict("qwen2_tied")), hf_llama.model_config(_hf_dict("qwen2_untied"))
    assert tied.qkv_bias and tied.tie_embeddings and not untied.tie_embeddings
    assert tied.hf_model_type == "qwen2" and tied.sliding_window is None  # use_sliding_window off
    names = [r.megatron for r in hf_llama.mapping(tied).layer_rules]
    assert "self_attention.linear_qkv.bias" in names and "mlp.linear_fc1.bias" not in names
    assert "output_layer.weight" not in [r.megatron for r in hf_llama.mapping(tied).global_rules]
    # parameter count = transformers' count (biases on Q/K/V only, embeddings once when tied)
    import transformers

    for cfg, name in ((tied, "qwen2_tied"), (untied, "qwen2_untied")):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(name))
        final_norm = cfg.hidden_size  # num_parameters (a planning figure) leaves the final norm out
        assert cfg.num_parameters() + final_norm == sum(p.numel() for p in hf.parameters()), name


def test_mistral_window_is_kept_and_bounds_sequence_length():
    from megatron_reft.config import Config, ConfigError, validate

    model = hf_llama.model_config(_hf_dict("mistral"))
    assert model.sliding_window == 96 and model.hf_model_type == "mistral"
    config = Config()
    config.data.max_length = 128
    with pytest.raises(ConfigError, match="data.max_length: 128 exceeds the model's sliding_window=96"):
        validate(config, model, job="sft", world_size=1)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn' is not supported"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
])
def test_unrepresentable_llama_configs_are_refused(change, message):
    hf = {**_hf_dict("llama_gqa"), **change}
    hf.pop("rope_parameters", None) if "rope_scaling" in change else None
    with pytest.raises(UnsupportedConfig, match=message):
        hf_llama.model_config(hf)


def test_unsupported_architecture_refused_in_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gemma2", "hidden_size": 64}))
    proc = subprocess.run([sys.executable, "-m", "megatron_reft.cli", "convert", "hf-to-megatron", "--hf-dir",
                           str(tmp_path / "hf"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'gemma2' is not supported (supported: llama, mistral, qwen2, opt)" in lines[0]
    assert not (tmp_path / "out").exists()

"""Llama family ⇄ megatron-core GPTModel: CodeLlama, Llama-2, Llama-3.x (RoPE scaling `llama3`),
Mistral (`mistral`), Qwen2/Qwen2.5 (`qwen2`: Q/K/V biases, tied or untied embeddings) and
SmolLM2 and other Llama-architecture models.

Tied embeddings (`tie_word_embeddings`, e.g. SmolLM2, small Qwen2): no output_layer tensor; the
model is built with share_embeddings_and_output_weights, and an lm_head that repeats the
embedding is ignored.

HF LlamaForCausalLM                                  megatron-core GPTModel (local spec names)
  model.embed_tokens.weight                          embedding.word_embeddings.weight (rows padded)
  model.layers.i.input_layernorm.weight              decoder.layers.i.input_layernorm.weight
  model.layers.i.self_attn.{q,k,v}_proj.weight       decoder.layers.i.self_attention.linear_qkv.weight
  model.layers.i.self_attn.{q,k,v}_proj.bias         decoder.layers.i.self_attention.linear_qkv.bias (qwen2)
  model.layers.i.self_attn.o_proj.weight             decoder.layers.i.self_attention.linear_proj.weight
  model.layers.i.post_attention_layernorm.weight     decoder.layers.i.pre_mlp_layernorm.weight
  model.layers.i.mlp.{gate,up}_proj.weight           decoder.layers.i.mlp.linear_fc1.weight ([gate; up])
  model.layers.i.mlp.down_proj.weight                decoder.layers.i.mlp.linear_fc2.weight
  model.norm.weight                                  decoder.final_layernorm.weight
  lm_head.weight                                     output_layer.weight (rows padded; absent when tied)

No Q/K permutation: megatron's default (non-interleaved) RoPE rotates halves like HF's rotate_half.
"""
from __future__ import annotations

import torch

from megatron_reft.checkpoint.mapping import (FamilyMapping, Rule, check, fuse_gated, qkv_rule,
                                              split_gated)
from megatron_reft.models.families import ModelConfig

MODEL_TYPES = ("llama", "mistral", "qwen2")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict) -> tuple[float, dict | None]:
    """RoPE theta and scaling from either config style (transformers 4: rope_theta/rope_scaling;
    5: rope_parameters). Plain RoPE or Llama-3's `llama3` scaling; anything else is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope = {**scaling, **params}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    check(rope_type == "llama3",
          f"llama: RoPE scaling {rope_type!r} is not supported (plain RoPE or llama3 scaling only)")
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in rope]
    check(not missing, f"llama: llama3 RoPE scaling lacks {', '.join(missing)}")
    return theta, {"type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS}}


def _check_biases(hf: dict, model_type: str) -> bool:
    """Whether Q/K/V carry biases: always for qwen2, never for llama/mistral (refused if set)."""
    check(not hf.get("mlp_bias", False), f"{model_type}: mlp_bias=true is not supported")
    if model_type == "qwen2":
        return True
    check(not hf.get("attention_bias", False), f"{model_type}: attention_bias=true is not supported")
    return False


def _sliding_window(hf: dict, model_type: str) -> int | None:
    """Mistral's window (always on when set); Qwen2's only with use_sliding_window."""
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window")


def model_config(hf: dict) -> ModelConfig:
    """HF config.json (as a dict) → ModelConfig; refuses what the megatron model cannot represent."""
    model_type = hf.get("model_type")
    check(model_type in MODEL_TYPES, f"llama: model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    check(hf.get("hidden_act", "silu") == "silu",
          f"{model_type}: hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    qkv_bias = _check_biases(hf, model_type)
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    check(hidden % heads == 0, f"{model_type}: hidden_size {hidden} is not divisible by {heads} heads")
    head_dim = hf.get("head_dim") or hidden // heads
    check(head_dim * heads == hidden,
          f"{model_type}: head_dim {head_dim} x {heads} heads != hidden_size {hidden} (not supported)")
    check(heads % groups == 0, f"{model_type}: {heads} heads are not divisible by {groups} key/value heads")
    theta, scaling = _rope(hf)
    return ModelConfig(
        family="llama",
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=qkv_bias,
        sliding_window=_sliding_window(hf, model_type),
        hf_model_type=None if model_type == "llama" else model_type,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )


def hf_config(model: ModelConfig) -> dict:
    """A complete HF config for a model that did not come from HF (no stored config.json)."""
    import transformers

    model_type = model.hf_model_type or "llama"
    cls, arch = {"llama": (transformers.LlamaConfig, "LlamaForCausalLM"),
                 "mistral": (transformers.MistralConfig, "MistralForCausalLM"),
                 "qwen2": (transformers.Qwen2Config, "Qwen2ForCausalLM")}[model_type]
    rope = {"rope_type": "default", "rope_theta": model.rope_theta}
    if model.rope_scaling is not None:
        rope = {**{k: model.rope_scaling[k] for k in LLAMA3_ROPE_KEYS}, "rope_type": "llama3",
                "rope_theta": model.rope_theta}
    extra = {"sliding_window": model.sliding_window} if model_type == "mistral" else {}
    if model_type == "qwen2" and model.sliding_window is not None:
        extra = {"use_sliding_window": True, "sliding_window": model.sliding_window}
    return cls(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        max_position_embeddings=model.max_position_embeddings,
        rope_theta=model.rope_theta,  # transformers 4 reads this, 5 reads rope_scaling's copy
        rope_scaling=rope,
        rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings,
        hidden_act="silu",
        initializer_range=model.init_std,
        architectures=[arch],
        **extra,
    ).to_dict()


def mapping(model: ModelConfig, extras: dict | None = None) -> FamilyMapping:
    global_rules = [
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if not model.tie_embeddings:
        global_rules.append(Rule("output_layer.weight", ("lm_head.weight",)))
    layer_rules = (
        Rule("input_layernorm.weight", ("input_layernorm.weight",)),
        qkv_rule(model, "self_attention.linear_qkv.weight",
                 "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        *([qkv_rule(model, "self_attention.linear_qkv.bias",
                    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")]
          if model.qkv_bias else []),
        Rule("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
        Rule("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
        Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
             fuse_gated, split_gated),
        Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
    )
    # Old .bin checkpoints carry RoPE's inverse frequencies (recomputed from theta); tied
    # checkpoints may repeat the embedding as lm_head.
    ignored = [r"rotary_emb\.inv_freq$"] + ([r"^lm_head\.weight$"] if model.tie_embeddings else [])
    return FamilyMapping(model, tuple(global_rules), layer_rules, "model.layers.{}.", tuple(ignored))


def hf_extras(read) -> dict[str, torch.Tensor]:
    """HF tensor content the megatron model has no place for (none for llama)."""
    return {}

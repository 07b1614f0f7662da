"""Llama family (CodeLlama, Llama-2, SmolLM2 and other Llama-architecture models) ⇄ megatron-core GPTModel.

Tied embeddings (`tie_word_embeddings`, e.g. SmolLM2): no output_layer tensor; the model is built
with share_embeddings_and_output_weights, and an lm_head that repeats the embedding is ignored.

HF LlamaForCausalLM                                  megatron-core GPTModel (local spec names)
  model.embed_tokens.weight                          embedding.word_embeddings.weight (rows padded)
  model.layers.i.input_layernorm.weight              decoder.layers.i.input_layernorm.weight
  model.layers.i.self_attn.{q,k,v}_proj.weight       decoder.layers.i.self_attention.linear_qkv.weight
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

MODEL_TYPES = ("llama",)


def _rope(hf: dict) -> float:
    """RoPE theta from either config style (transformers 4: rope_theta/rope_scaling; 5: rope_parameters)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    check(rope_type == "default",
          f"llama: RoPE scaling {rope_type!r} is not supported (only plain RoPE with a configurable theta)")
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def model_config(hf: dict) -> ModelConfig:
    """HF config.json (as a dict) → ModelConfig; refuses what the megatron model cannot represent."""
    check(hf.get("model_type") in MODEL_TYPES, f"llama: model_type {hf.get('model_type')!r} is not llama")
    check(hf.get("hidden_act", "silu") == "silu",
          f"llama: hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    check(not hf.get("attention_bias", False), "llama: attention_bias=true is not supported")
    check(not hf.get("mlp_bias", False), "llama: mlp_bias=true is not supported")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    check(hidden % heads == 0, f"llama: hidden_size {hidden} is not divisible by {heads} heads")
    head_dim = hf.get("head_dim") or hidden // heads
    check(head_dim * heads == hidden,
          f"llama: head_dim {head_dim} x {heads} heads != hidden_size {hidden} (not supported)")
    check(heads % groups == 0, f"llama: {heads} heads are not divisible by {groups} key/value heads")
    return ModelConfig(
        family="llama",
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=_rope(hf),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=hf.get("initializer_range", 0.02),
    )


def hf_config(model: ModelConfig) -> dict:
    """A complete HF config for a model that did not come from HF (no stored config.json)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        max_position_embeddings=model.max_position_embeddings,
        rope_theta=model.rope_theta,
        rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings,
        hidden_act="silu",
        initializer_range=model.init_std,
        architectures=["LlamaForCausalLM"],
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

"""OPT family (Galactica) ⇄ megatron-core GPTModel.

HF OPTForCausalLM (pre-LN, word_embed_proj_dim == hidden)    megatron-core GPTModel (local spec names)
  model.decoder.embed_tokens.weight                          embedding.word_embeddings.weight (rows padded)
  model.decoder.embed_positions.weight [max_pos + 2, h]      embedding.position_embeddings.weight = rows [2:]
  model.decoder.layers.i.self_attn_layer_norm.{weight,bias}  decoder.layers.i.input_layernorm.{weight,bias}
  model.decoder.layers.i.self_attn.{q,k,v}_proj.{weight,bias} decoder.layers.i.self_attention.linear_qkv.{weight,bias}
  model.decoder.layers.i.self_attn.out_proj.{weight,bias}    decoder.layers.i.self_attention.linear_proj.{weight,bias}
  model.decoder.layers.i.final_layer_norm.{weight,bias}      decoder.layers.i.pre_mlp_layernorm.{weight,bias}
  model.decoder.layers.i.fc1.{weight,bias}                   decoder.layers.i.mlp.linear_fc1.{weight,bias}
  model.decoder.layers.i.fc2.{weight,bias}                   decoder.layers.i.mlp.linear_fc2.{weight,bias}
  model.decoder.final_layer_norm.{weight,bias}               decoder.final_layernorm.{weight,bias}
  lm_head.weight                                             tied to the word embeddings (output_layer when untied)

HF's per-layer `final_layer_norm` is the pre-MLP norm, not the model's final norm. OPT offsets
position ids by 2, so megatron's table is HF's without its first two rows; those two rows are
kept beside the megatron checkpoint (hf/extras.safetensors) so an export gives them back.
"""
from __future__ import annotations

import torch

from megatron_reft.checkpoint.mapping import FamilyMapping, Rule, check, qkv_rule
from megatron_reft.models.families import ModelConfig

MODEL_TYPES = ("opt",)
POSITION_OFFSET = 2
ACTIVATIONS = ("gelu", "relu")  # HF "gelu" is the exact erf GELU, like torch's F.gelu


def model_config(hf: dict) -> ModelConfig:
    check(hf.get("model_type") in MODEL_TYPES, f"opt: model_type {hf.get('model_type')!r} is not opt")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    check(hf.get("do_layer_norm_before", True),
          "opt: post-LayerNorm models (do_layer_norm_before=false, e.g. opt-350m) are not supported")
    check(hf.get("word_embed_proj_dim", hidden) == hidden,
          f"opt: word_embed_proj_dim {hf.get('word_embed_proj_dim')} != hidden_size {hidden} "
          "(project_in/project_out layers) is not supported")
    check(hf.get("enable_bias", True), "opt: enable_bias=false is not supported")
    check(hf.get("layer_norm_elementwise_affine", True),
          "opt: layer_norm_elementwise_affine=false is not supported")
    check(not hf.get("_remove_final_layer_norm", False), "opt: _remove_final_layer_norm=true is not supported")
    act = hf.get("activation_function", "relu")
    check(act in ACTIVATIONS, f"opt: activation_function {act!r} is not supported (choose from {ACTIVATIONS})")
    check(hidden % heads == 0, f"opt: hidden_size {hidden} is not divisible by {heads} heads")
    return ModelConfig(
        family="opt",
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        ffn_hidden_size=hf["ffn_dim"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        norm_eps=1e-5,  # HF's OPT uses nn.LayerNorm's default eps
        activation=act,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init_std=hf.get("init_std", 0.02),
    )


def hf_config(model: ModelConfig) -> dict:
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        ffn_dim=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        max_position_embeddings=model.max_position_embeddings,
        activation_function=model.activation,
        do_layer_norm_before=True,
        word_embed_proj_dim=model.hidden_size,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        tie_word_embeddings=model.tie_embeddings,
        dropout=0.0,
        attention_dropout=0.0,
        init_std=model.init_std,
        architectures=["OPTForCausalLM"],
    ).to_dict()


def _positions_rule(model: ModelConfig, extras: dict | None) -> Rule:
    offset_rows = (extras or {}).get("position_offset_rows")
    if offset_rows is None:  # a model that never was an HF model: rows 0, 1 are unused padding slots
        offset_rows = torch.zeros(POSITION_OFFSET, model.hidden_size)

    def to_hf(table):
        return (torch.cat([offset_rows.to(device=table.device, dtype=table.dtype), table], dim=0),)

    return Rule("embedding.position_embeddings.weight", ("model.decoder.embed_positions.weight",),
                lambda t: t[POSITION_OFFSET:], to_hf)


def mapping(model: ModelConfig, extras: dict | None = None) -> FamilyMapping:
    global_rules = [
        Rule("embedding.word_embeddings.weight", ("model.decoder.embed_tokens.weight",)),
        _positions_rule(model, extras),
        Rule("decoder.final_layernorm.weight", ("model.decoder.final_layer_norm.weight",)),
        Rule("decoder.final_layernorm.bias", ("model.decoder.final_layer_norm.bias",)),
    ]
    if not model.tie_embeddings:
        global_rules.append(Rule("output_layer.weight", ("lm_head.weight",)))
    layer_rules = []
    for p in ("weight", "bias"):
        layer_rules += [
            Rule(f"input_layernorm.{p}", (f"self_attn_layer_norm.{p}",)),
            qkv_rule(model, f"self_attention.linear_qkv.{p}",
                     f"self_attn.q_proj.{p}", f"self_attn.k_proj.{p}", f"self_attn.v_proj.{p}"),
            Rule(f"self_attention.linear_proj.{p}", (f"self_attn.out_proj.{p}",)),
            Rule(f"pre_mlp_layernorm.{p}", (f"final_layer_norm.{p}",)),
            Rule(f"mlp.linear_fc1.{p}", (f"fc1.{p}",)),
            Rule(f"mlp.linear_fc2.{p}", (f"fc2.{p}",)),
        ]
    ignored = [r"^lm_head\.weight$"] if model.tie_embeddings else []
    return FamilyMapping(model, tuple(global_rules), tuple(layer_rules), "model.decoder.layers.{}.",
                         tuple(ignored))


def hf_extras(read) -> dict[str, torch.Tensor]:
    """The two position rows before OPT's offset: unused by megatron, kept for an exact export."""
    return {"position_offset_rows": read("model.decoder.embed_positions.weight")[:POSITION_OFFSET].clone()}

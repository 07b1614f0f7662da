"""megatron-core's `TransformerLayer` with a lean forward for generation (prefill and decode
against the static KV cache, gradients off).

A decode step through megatron's layer passes, per layer: the layer's and the attention's
forwards with their branches for recompute, activation offloading, flash decoding, fused RoPE,
CUDA graphs, cross-attention (an identity in GPT) and the bias-dropout-add factory — host work
that on a GPU is paid before every kernel launch and, for one token per row, costs more than the
kernels (docs/benchmarks.md, "First GPU run": the H200's decode was host-bound). When none of
those features is on, the forward is the same short sequence of megatron's own submodules:

    residual = h;  h = attention(input_layernorm(h)) (+ bias) + residual
    residual = h;  h = mlp(pre_mlp_layernorm(h)) (+ bias) + residual

with the attention as the QKV projection split into views as megatron splits it (its own
`get_query_key_value_tensors` where a TP rank holds part of a query group or Q/K norms are on), the
KV-cache update (`_adjust_key_value_for_inference`, ours in models/sdpa_attention.py), RoPE on
the query when the cache step left it to the forward, `core_attention` and `linear_proj`. The ops
and their order are megatron's, so the outputs are bit-identical (tests/test_speed_paths.py);
anything else — training, gradients, log-prob passes, dynamic batching, the configurations named
in `_lean_layer` — takes megatron's forward unchanged.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_reft.models.sdpa_attention import megatron_rope


def _lean_layer(layer: TransformerLayer) -> bool:
    """The layer (not the call) has none of the features the lean forward leaves out."""
    cached = getattr(layer, "_reft_lean", None)
    if cached is None:
        c, attention = layer.config, layer.self_attention
        cached = (not layer.is_moe_layer and isinstance(layer.cross_attention, IdentityOp)
                  and not (layer.recompute_input_layernorm or layer.recompute_pre_mlp_layernorm or layer.recompute_mlp)
                  and not (layer.offload_attn_norm or layer.offload_mlp_norm)
                  and not (attention.offload_qkv_linear or attention.offload_attn_proj)
                  and getattr(attention, "attention_type", "self") == "self"
                  and not c.flash_decode and not c.fused_single_qkv_rope and not c.attention_output_gate
                  and not c.no_rope_freq and not c.inference_fuse_tp_communication
                  and not c.bias_dropout_fusion  # a fused kernel may round differently in bf16
                  and c.mlp_chunks_for_prefill <= 1 and not hasattr(layer, "cudagraph_manager"))
        layer._reft_lean = cached
    return cached


def _plain_qkv(attention) -> bool:
    """Each TP rank holds whole query groups and the Q/K norms are identities (cached: a
    property of the module, read at every decode step)."""
    cached = getattr(attention, "_reft_plain_qkv", None)
    if cached is None:
        plain = lambda norm: norm is None or isinstance(norm, IdentityOp)
        cached = (attention.config.num_query_groups >= attention.world_size
                  and plain(attention.q_layernorm) and plain(attention.k_layernorm))
        attention._reft_plain_qkv = cached
    return cached


class InferenceTransformerLayer(TransformerLayer):
    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                inference_context=None, packed_seq_params=None, sequence_len_offset=None, padding_mask=None,
                **kwargs):
        lean = (inference_context is not None and not self.training and not torch.is_grad_enabled()
                and inference_context.is_static_batching() and not kwargs
                and context is None and attention_bias is None and packed_seq_params is None
                and rotary_pos_cos is None and rotary_pos_sin is None and rotary_pos_cos_sin is None
                and _lean_layer(self))
        if not lean:
            return super().forward(hidden_states, attention_mask=attention_mask, context=context,
                                   context_mask=context_mask, rotary_pos_emb=rotary_pos_emb,
                                   rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                                   rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                                   inference_context=inference_context, packed_seq_params=packed_seq_params,
                                   sequence_len_offset=sequence_len_offset, padding_mask=padding_mask, **kwargs)
        attention = _attention(self.self_attention, self.input_layernorm(hidden_states), attention_mask,
                               inference_context, rotary_pos_emb, sequence_len_offset)
        hidden_states = _bias_add_residual(attention, hidden_states)
        mlp = self.mlp(self.pre_mlp_layernorm(hidden_states))
        return _bias_add_residual(mlp, hidden_states), context


def _attention(attention, hidden_states, attention_mask, inference_context, rotary_pos_emb, sequence_len_offset):
    """megatron's `Attention.forward` for static-batching inference, split-QKV path, without
    the branches `_lean_layer` rules out."""
    if rotary_pos_emb is not None and not isinstance(rotary_pos_emb, tuple):
        rotary_pos_emb = (rotary_pos_emb,) * 2
    query, key, value = _query_key_value(attention, hidden_states)
    query, key, value, rotary_pos_emb, mask_type, _ = attention._adjust_key_value_for_inference(
        inference_context, query, key, value, rotary_pos_emb, None, None, None, sequence_len_offset)
    if rotary_pos_emb is not None:
        q_pos_emb, k_pos_emb = rotary_pos_emb
        if q_pos_emb is not None:
            query = megatron_rope(attention, query, q_pos_emb)
        if k_pos_emb is not None:
            key = megatron_rope(attention, key, k_pos_emb)
    context = attention.core_attention(query, key, value, attention_mask, attn_mask_type=mask_type)
    return attention.linear_proj(context)


def _query_key_value(attention, hidden_states):
    """megatron's `get_query_key_value_tensors` (no output gate) where each TP rank holds whole
    query groups and Q/K norms are identities: the QKV projection viewed as [sq, b, groups,
    (heads per group + 2) · head dim] and split into views — the same tensors, without its
    general-case branches; anything else is megatron's own function."""
    if not _plain_qkv(attention):
        return attention.get_query_key_value_tensors(hidden_states)
    mixed, _ = attention.linear_qkv(hidden_states)
    groups, head_dim = attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head
    per_group = attention.num_attention_heads_per_partition // groups
    mixed = mixed.view(*mixed.shape[:-1], groups, (per_group + 2) * head_dim)
    query, key, value = torch.split(mixed, [per_group * head_dim, head_dim, head_dim], dim=3)
    return query.reshape(query.size(0), query.size(1), -1, head_dim), key, value


def _bias_add_residual(output_with_bias, residual):
    """megatron's bias-dropout-add in eval mode without gradients: (x + bias) + residual, in
    place on x (dropout is the identity there)."""
    x, bias = output_with_bias
    if residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    if bias is not None:
        x = x.add_(bias)
    return x.add_(residual)

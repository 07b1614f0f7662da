"""Core attention for megatron-core's local (non-Transformer-Engine) layer spec, on
`torch.nn.functional.scaled_dot_product_attention`.

megatron's own `DotProductAttention` materialises [b·heads, s, s] scores with `baddbmm`, applies
a boolean mask tensor through a separate softmax module and repeats K/V for grouped-query
attention. This subclass keeps its constructor (so every config field, the TP head split and
`softmax_scale` incl. query-key layer scaling are megatron's) and replaces only `forward`:

- causal self-attention (training, log-prob passes, the prefill of generation) runs with
  `is_causal=True` and no mask tensor;
- one query against a KV cache (decoding) runs with no mask, as megatron's softmax does (on
  CPU as two batched matmuls and a softmax, `one_query_attention`: faster than the kernel there);
- an explicit boolean mask (True = not allowed, megatron's convention) is honoured when a caller
  passes one (e.g. padding masks), so it is a drop-in replacement;
- GQA goes to the kernel with `enable_gqa=True` (torch ≥ 2.5) instead of repeated K/V.

Configurations this kernel cannot reproduce exactly (attention dropout while training, a
sliding window, off-by-one/learnable softmax) fall back to megatron's forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_reft.models.fused_elementwise import rope_cos_sin, rope_rotate, rotate_query_key

try:  # enable_gqa arrived in torch 2.5; a builtin's signature is not introspectable: probe once
    F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2),
                                   torch.zeros(1, 1, 1, 2), enable_gqa=True)
    _SDPA_HAS_GQA = True
except (TypeError, RuntimeError):
    _SDPA_HAS_GQA = False


class SDPADotProductAttention(DotProductAttention):
    """Drop-in `core_attention` module: same inputs ([s, b, heads, dim]) and output ([sq, b, hp])."""

    def _falls_back(self) -> bool:
        dropout = self.attention_dropout.p if self.training else 0.0
        return (dropout > 0.0 or self.softmax_offset is not None
                or self.scale_mask_softmax.window_size is not None)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self._falls_back() or attention_bias is not None or packed_seq_params is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        sq, batch = query.shape[0], query.shape[1]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        kwargs = {}
        if groups > 1:
            if _SDPA_HAS_GQA:
                kwargs["enable_gqa"] = True
            else:  # older torch: repeat K/V like megatron does
                key = key.repeat_interleave(groups, dim=2)
                value = value.repeat_interleave(groups, dim=2)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed, causal = self._mask(attention_mask, mask_type, sq, k.shape[2], q.device)
        if sq == 1 and q.device.type == "cpu":
            context = one_query_attention(q, k, v, allowed, self._scale())
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal,
                                                     scale=self._scale(), **kwargs)
        # [b, n, sq, d] -> [sq, b, n·d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, self.hidden_size_per_partition)

    def _scale(self) -> float:
        """megatron's net scale: with query-key layer scaling it divides `softmax_scale` by the
        layer number and its softmax multiplies the scores back by it."""
        coeff = self.scale_mask_softmax.scale
        return self.softmax_scale * coeff if coeff is not None else self.softmax_scale

    @staticmethod
    def _mask(attention_mask, mask_type, sq: int, sk: int, device):
        """(boolean 'allowed' mask or None, is_causal) for the kernel."""
        if attention_mask is not None:
            return ~attention_mask.to(torch.bool), False
        if mask_type != AttnMaskType.causal or sq == 1:
            return None, False  # no mask, or one new token that may see the whole cache
        if sq == sk:
            return None, True
        # Several new tokens after a cached prefix: causal aligned to the end (bottom-right).
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
        return allowed, False


def one_query_attention(q, k, v, allowed, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v for one query per row (a decode step), q [b, n, 1, d] against
    K/V [b, groups, s, d]; `allowed` None or a boolean mask broadcastable to [b, n, 1, s].

    On CPU this is 1.2–1.8x faster than `scaled_dot_product_attention` at decode shapes (its
    flash kernel tiles for long queries; here there is one). The heads sharing a K/V group are
    stacked as that group's query rows, so K/V are read once per group and never repeated."""
    b, n, _, d = q.shape
    groups = k.shape[1]
    grouped = (q * scale).reshape(b, groups, n // groups, d)  # [b, groups, heads per group, d]
    scores = torch.matmul(grouped, k.transpose(-1, -2))  # [b, groups, heads per group, s]
    if allowed is not None:  # an additive bias at the mask's own (broadcast) shape, not [b, n, 1, s]
        bias = torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device).masked_fill_(~allowed, float("-inf"))
        if allowed.shape[1] != 1:  # one mask per head: that head's row of its group
            bias = bias.reshape(allowed.shape[0], groups, n // groups, allowed.shape[-1])
        scores = scores + bias
    return torch.matmul(scores.softmax(dim=-1), v).reshape(b, n, 1, d)


def rope_cached_self_attention():
    """megatron's `SelfAttention` with RoPE applied to a key once, when it enters the static KV
    cache, instead of to the whole cached key at every decode step (megatron-core 0.16.1's static
    path caches raw keys and re-rotates all of them per step: O(sequence) work per token, ~20 % of
    a CPU decode step at the quickstart shape). Rotation is elementwise, so the rotated keys are
    the same numbers either way; queries are still rotated by `Attention.forward`.

    Per-row positions (continuous batching, generation/continuous.py): when the context carries
    `row_positions` (one position per row for a one-token step), the new key and the query of each
    row are rotated by that row's own position instead of the cache slot.

    The fixed-shape decode step (generation/static_step.py): when the context carries a
    `write_slot` tensor, the rotated key and the value go to the cache through
    `write_static_slot` instead of megatron's slicing at `sequence_len_offset`."""
    from megatron.core.transformer.attention import SelfAttention

    class RopeCachedSelfAttention(SelfAttention):
        writes_static_slot = True  # generation/static_step.py may run this attention

        def _allocate_memory(self, max_sequence_length, batch_size, dim, dtype):
            """The static KV cache, stored batch-first ([b, groups, s, dim] in memory) and
            handed out as megatron's [s, b, groups, dim] view: every write and slice megatron
            and the engine make works on the view unchanged, while SDPA, which reads [b, groups,
            s, dim], gets one contiguous (s, dim) block per row and group instead of keys
            strided by b·groups·dim (~1.5x faster attention per CPU decode step at the
            quickstart shape; the numbers are the same)."""
            like = super()._allocate_memory(1, 1, dim, dtype)  # megatron's device choice
            stored = torch.empty(batch_size, self.num_query_groups_per_partition, max_sequence_length, dim,
                                 dtype=dtype, device=like.device)
            return stored.permute(2, 0, 1, 3)

        def forward(self, hidden_states, *args, **kwargs):
            # Packed (THD) sequences rotate by cu_seqlens, which the cache step does not see.
            self._packed_call = bool(args) or kwargs.get("packed_seq_params") is not None
            return super().forward(hidden_states, *args, **kwargs)

        def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                            *args, **kwargs):
            if (inference_context is None and rotary_pos_emb is not None and self._plain_rope()
                    and not getattr(self, "_packed_call", True) and rotary_pos_emb[0] is rotary_pos_emb[1]):
                # Training and log-prob passes: query and key rotated in one autograd node
                # (models/fused_elementwise.py, bit-identical); megatron's forward then skips RoPE.
                cos, sin = rope_cos_sin(rotary_pos_emb[0], _yarn_get_concentration_factor_from_config(self.config),
                                        key.dtype)
                query, key = rotate_query_key(query, key, cos, sin)
                return query, key, value, None, self.attn_mask_type, None
            if (inference_context is None or rotary_pos_emb is None or self.config.flash_decode
                    or not inference_context.is_static_batching()):
                return super()._adjust_key_value_for_inference(inference_context, query, key, value,
                                                               rotary_pos_emb, *args, **kwargs)
            q_pos_emb, k_pos_emb = rotary_pos_emb
            start = inference_context.sequence_len_offset
            if self._plain_rope() and query.size(0) == key.size(0):
                # The new tokens' queries and keys share positions: one (cos, sin) for both, and
                # for every layer of this step (megatron computes them per call, twice a layer).
                cos, sin = self._step_rotation(inference_context, k_pos_emb, start, key.size(0), key.dtype)
                query, key = _rotate_both(query, key, cos, sin)
                query_rotation = None
            else:
                rows = getattr(inference_context, "row_positions", None)
                q_pos_emb = _new_angles(q_pos_emb, rows, start, query.size(0))
                k_pos_emb = _new_angles(k_pos_emb, rows, start, key.size(0))
                key = megatron_rope(self, key, k_pos_emb)
                query_rotation = (q_pos_emb, None)  # the key is rotated already: forward rotates the query
            if static_write_slot(inference_context) is not None:
                # A replayed graph reads this angle table by address; megatron keeps it in an LRU
                # cache that other lengths (admission prefills, training passes) can evict.
                inference_context.rope_table = rotary_pos_emb
                key, value = write_static_slot(self, inference_context, key, value)
                return query, key, value, query_rotation, AttnMaskType.no_mask, None
            query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
                inference_context, query, key, value, None, *args, **kwargs)
            return query, key, value, query_rotation, mask_type, block_table

        def _plain_rope(self) -> bool:
            """megatron's unfused, non-interleaved RoPE on one context-parallel rank: the case
            `rope_rotate` reproduces value for value."""
            c = self.config
            return (not c.apply_rope_fusion and not c.rotary_interleaved and not c.multi_latent_attention
                    and self.pg_collection.cp.size() == 1)

        def _step_rotation(self, inference_context, pos_emb, start: int, length: int, dtype):
            """(cos, sin) of this step's new positions, as megatron's `_apply_rotary_pos_emb_bshd`
            computes them; cached on the inference context for the step's other layers. The
            cache holds the angle table and the per-row positions it was made from, so a later
            step (new positions, or a new table) can never match it by a reused id."""
            rows = getattr(inference_context, "row_positions", None)
            mscale = _yarn_get_concentration_factor_from_config(self.config)
            key = (start, length, dtype, mscale)
            cached = getattr(inference_context, "_reft_rotation", None)
            if cached is not None and cached[0] is pos_emb and cached[1] is rows and cached[2] == key:
                return cached[3]
            freqs = _new_angles(pos_emb, rows, start, length)
            rotation = rope_cos_sin(freqs, mscale, dtype)
            inference_context._reft_rotation = (pos_emb, rows, key, rotation)
            return rotation

    return RopeCachedSelfAttention


def static_slot_self_attention():
    """megatron's `SelfAttention` (learned positions: OPT) with the static-shape decode step's
    cache write and read (`write_static_slot`); every other call is megatron's."""
    from megatron.core.transformer.attention import SelfAttention

    class StaticSlotSelfAttention(SelfAttention):
        writes_static_slot = True  # generation/static_step.py may run this attention

        def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb,
                                            *args, **kwargs):
            if rotary_pos_emb is None and static_write_slot(inference_context) is not None:
                key, value = write_static_slot(self, inference_context, key, value)
                return query, key, value, None, AttnMaskType.no_mask, None
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)

    return StaticSlotSelfAttention


def static_write_slot(inference_context) -> torch.Tensor | None:
    """The cache slot of a static-shape decode step (generation/static_step.py), as a [1] tensor;
    None for every other forward."""
    if inference_context is None or not inference_context.is_static_batching():
        return None
    return getattr(inference_context, "write_slot", None)


def write_static_slot(attention, inference_context, key: torch.Tensor, value: torch.Tensor):
    """The static-shape decode step's KV-cache update: this step's key and value [1, b, groups,
    dim] written at the cache slot held by the tensor `write_slot`, and the whole cache of rows
    [0, b) returned ([slots, b, groups, dim]; the step's mask hides the slots a row may not see).
    megatron's static path slices the cache at `sequence_len_offset`, a Python int that a
    replayed CUDA graph would keep at its captured value; here nothing depends on the step."""
    keys, values = inference_context.key_value_memory_dict[attention.layer_number]
    slot, rows = inference_context.write_slot, key.size(1)
    keys[:, :rows].index_copy_(0, slot, key)
    values[:, :rows].index_copy_(0, slot, value)
    return keys[:, :rows], values[:, :rows]


def megatron_rope(attention, t: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
    """`t` rotated by megatron's own RoPE as `Attention.forward` applies it (static batching)."""
    return apply_rotary_pos_emb(t, pos_emb, config=attention.config,
                                mscale=_yarn_get_concentration_factor_from_config(attention.config),
                                cp_group=attention.pg_collection.cp)


def _new_angles(pos_emb: torch.Tensor, rows, start: int, length: int) -> torch.Tensor:
    """RoPE angles of the tokens a step feeds: each row's own position for a one-token step
    with per-row positions (`row_positions` [b] -> [1, b, 1, dim]), else the cache slots
    [start, start + length)."""
    if rows is not None and length == 1:
        return pos_emb[rows].transpose(0, 1)
    return pos_emb[start:start + length]


def _rotate_both(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """`rope_rotate` of the query and the key at the same positions ([s, b, heads | groups, dim])
    as one tensor: half the ops of a decode step's RoPE, each element computed as it is alone."""
    heads = query.size(2)
    rotated = rope_rotate(torch.cat((query, key), dim=2), cos, sin)
    return rotated[:, :, :heads], rotated[:, :, heads:]

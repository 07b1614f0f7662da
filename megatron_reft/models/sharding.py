"""The one place that knows how a full (unsharded) megatron-core tensor splits across TP ranks.

Used by deterministic initialisation (draw full tensor, keep the local shard) and by the
HF ⇄ Megatron converters. Names are megatron-core `GPTModel` parameter names with GLOBAL layer
numbers (`decoder.layers.<global index>.…`).

Rules (conversion_facts.md):
- vocab-parallel (word embeddings, output layer): rows padded to the padded vocabulary, split on dim 0;
- column-parallel (linear_qkv, linear_fc1): split on dim 0 — QKV is stored group-major, so a
  contiguous split keeps whole query groups; SwiGLU's fc1 is [gate; up] and each half is
  split separately (rank i holds [gate_i; up_i]);
- row-parallel (linear_proj, linear_fc2 weights): split on dim 1; their biases are replicated;
- everything else (norms, positions, value head) is replicated.
"""
from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def kind(name: str) -> str:
    """'vocab', 'column', 'gated_column', 'row' or 'replicated' for a global parameter name."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return "vocab"
    if "layer_norm_" in name or "layernorm" in name:
        return "replicated"
    if re.search(r"linear_fc1\.(weight|bias)$", name):
        return "gated_column"  # caller passes gated=False for non-gated MLPs
    if re.search(r"linear_qkv\.(weight|bias)$", name):
        return "column"
    if re.search(r"(linear_proj|linear_fc2)\.weight$", name):
        return "row"
    return "replicated"


def shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int, *, gated: bool,
          padded_vocab: int | None = None) -> torch.Tensor:
    """The TP rank's slice of a full tensor."""
    k = kind(name)
    if k == "vocab":
        if padded_vocab is not None and full.shape[0] < padded_vocab:
            pad = full.new_zeros((padded_vocab - full.shape[0],) + tuple(full.shape[1:]))
            full = torch.cat([full, pad], dim=0)
        return full.chunk(tp_size, dim=0)[tp_rank]
    if k == "gated_column" and gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]], dim=0)
    if k in ("column", "gated_column"):
        return full.chunk(tp_size, dim=0)[tp_rank]
    if k == "row":
        return full.chunk(tp_size, dim=1)[tp_rank]
    return full


def unshard(name: str, shards: list[torch.Tensor], *, gated: bool,
            true_vocab: int | None = None) -> torch.Tensor:
    """Inverse of `shard`: the full tensor from all TP ranks' shards (rank order)."""
    k = kind(name)
    if k == "vocab":
        full = torch.cat(shards, dim=0)
        return full[:true_vocab] if true_vocab is not None else full
    if k == "gated_column" and gated:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])], dim=0)
    if k in ("column", "gated_column"):
        return torch.cat(shards, dim=0)
    if k == "row":
        return torch.cat(shards, dim=1)
    return shards[0]


def global_layer_name(local_name: str, layer_offset: int) -> str:
    """`decoder.layers.<local i>.x` → `decoder.layers.<i + offset>.x` (pipeline stages)."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    return f"decoder.layers.{int(m.group(1)) + layer_offset}." + local_name[m.end():]


def local_layer_name(global_name: str, layer_offset: int) -> str:
    m = _LAYER.match(global_name)
    if not m:
        return global_name
    return f"decoder.layers.{int(m.group(1)) - layer_offset}." + global_name[m.end():]


def layer_index(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None

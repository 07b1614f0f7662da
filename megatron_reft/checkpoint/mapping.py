"""What the Hugging Face ⇄ megatron-core mappings share: rules as data, tensor layouts, names.

A family module (hf_llama, hf_opt) describes itself as a list of `Rule`s: one megatron tensor
made from one or more Hugging Face tensors, with the function each way. Layer rules use names
relative to a transformer layer; the converter adds `decoder.layers.<i>.` / the HF layer prefix.

Megatron names here are the *local* layer spec's parameter names with global layer numbers
(`decoder.layers.3.input_layernorm.weight`). The Transformer Engine spec fuses the norms into
the following linear (`self_attention.linear_qkv.layer_norm_weight`), and a `torch_dist`
checkpoint always stores the TE names, stacked over layers (`checkpoint_key`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from megatron_reft.models.families import ModelConfig


class UnsupportedConfig(ValueError):
    """A Hugging Face config our megatron model cannot represent exactly."""


@dataclass(frozen=True)
class Rule:
    megatron: str  # megatron name (relative to the layer for layer rules)
    hf: tuple[str, ...]  # HF names (relative to the HF layer prefix for layer rules)
    to_megatron: Callable[..., torch.Tensor] = None  # (*hf tensors) -> megatron tensor
    to_hf: Callable[[torch.Tensor], Sequence[torch.Tensor]] = None  # megatron -> HF tensors

    def __post_init__(self):
        if self.to_megatron is None:  # one-to-one copy
            object.__setattr__(self, "to_megatron", lambda t: t)
            object.__setattr__(self, "to_hf", lambda t: (t,))


@dataclass(frozen=True)
class FamilyMapping:
    """Everything the converter needs to know about one family for one model."""

    model: ModelConfig
    global_rules: tuple[Rule, ...]  # embeddings, final norm, output layer
    layer_rules: tuple[Rule, ...]
    hf_layer_prefix: str  # e.g. "model.layers.{}."
    ignored_hf: tuple[str, ...] = ()  # regexes of HF tensors that carry no information

    def hf_layer_name(self, layer: int, name: str) -> str:
        return self.hf_layer_prefix.format(layer) + name

    @property
    def embedding_rules(self) -> tuple[Rule, ...]:
        """Global rules of the first pipeline stage (written before the layers)."""
        return tuple(r for r in self.global_rules if r.megatron.startswith("embedding."))

    @property
    def final_rules(self) -> tuple[Rule, ...]:
        """Global rules of the last stage: final norm, output layer (written after the layers)."""
        return tuple(r for r in self.global_rules if not r.megatron.startswith("embedding."))

    def hf_names(self) -> list[str]:
        """Every HF tensor name the mapping reads or writes, in writing order."""
        names = [n for r in self.embedding_rules for n in r.hf]
        for i in range(self.model.num_layers):
            names += [self.hf_layer_name(i, n) for r in self.layer_rules for n in r.hf]
        return names + [n for r in self.final_rules for n in r.hf]

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.search(p, hf_name) for p in self.ignored_hf)


# ---- tensor layouts -------------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """HF's separate Q, K, V → megatron's fused QKV, grouped by query group.

    megatron-core splits `linear_qkv`'s output as [groups, (heads/groups + 2) · head_dim]:
    each group's query heads, then its key head, then its value head. Works for weights
    ([out, in]) and biases ([out]).
    """
    rest = q.shape[1:]
    head_dim = q.shape[0] // heads
    q = q.reshape(groups, heads // groups * head_dim, *rest)
    k = k.reshape(groups, head_dim, *rest)
    v = v.reshape(groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of fuse_qkv."""
    rest = qkv.shape[1:]
    per_group = heads // groups
    head_dim = qkv.shape[0] // (groups * (per_group + 2))
    grouped = qkv.reshape(groups, (per_group + 2) * head_dim, *rest)
    q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def fuse_gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: megatron's linear_fc1 is [gate; up] (the activation applies to the first half)."""
    return torch.cat([gate, up], dim=0)


def split_gated(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def qkv_rule(model: ModelConfig, megatron: str, q: str, k: str, v: str) -> Rule:
    heads, groups = model.num_attention_heads, model.num_query_groups
    return Rule(megatron, (q, k, v),
                lambda q_, k_, v_: fuse_qkv(q_, k_, v_, heads, groups),
                lambda qkv: split_qkv(qkv, heads, groups))


# ---- names ----------------------------------------------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Norms: local spec (separate modules) ⇄ Transformer Engine spec (fused into the next linear).
LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
TE_TO_LOCAL = {te: local for local, te in LOCAL_TO_TE.items()}


def _translate(name: str, table: dict[str, str]) -> str:
    m = _LAYER.match(name)
    if m:
        return f"decoder.layers.{m.group(1)}." + table.get(m.group(2), m.group(2))
    return table.get(name, name)


def to_te_name(name: str) -> str:
    """Local-spec megatron name → Transformer Engine spec name (identity for other tensors)."""
    return _translate(name, LOCAL_TO_TE)


def to_local_name(name: str) -> str:
    """Transformer Engine spec megatron name → local-spec name."""
    return _translate(name, TE_TO_LOCAL)


def split_layer(name: str) -> tuple[int | None, str]:
    """`decoder.layers.3.x` → (3, 'x'); other names → (None, name)."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def checkpoint_key(name: str) -> tuple[str, int | None]:
    """Megatron name (either spec) → (torch_dist key, layer index or None).

    torch_dist stores layer tensors under one key per kind, stacked on a leading layer axis,
    always with the TE spec's names: `model.decoder.layers.self_attention.linear_qkv.layer_norm_weight`.
    """
    layer, rest = split_layer(to_te_name(name))
    if layer is None:
        return "model." + rest, None
    return "model.decoder.layers." + rest, layer


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedConfig(message)

"""The output layer's matmul (hidden → vocabulary logits) with oneDNN's kernel on CPU where it pays.

megatron's `ColumnParallelLinear` multiplies with `torch.matmul`, which on CPU is MKL's sgemm.
oneDNN's fp32 inner product (models/cpu_matmul.py) measured 1.1–2.1× faster for the output
layer's shape at decode's 1–128 rows and 1.0–1.3× at 512–2048 on the Intel VMs of earlier
sessions (`benchmarks/output_projection.py`, docs/benchmarks.md, seventh round), ~2.3× at any
row count above its crossover on the AMD VM of the twelfth round. It is taken by the rule of
`cpu_matmul.takes_onednn` (rows × vocabulary × hidden multiply-adds); forward, input gradient
and weight gradient all run on it, the weight gradient left in `.grad` for megatron's DDP hook
to accumulate, as megatron's own layer does without fused gradient accumulation.

The oneDNN path is taken only on CPU, in fp32, with TP = 1 (tensor-parallel layouts keep
megatron's layer, whose communication is the point there) and without megatron's fused
gradient accumulation (a GPU feature). Everything else calls the output layer itself.
"""
from __future__ import annotations

import torch

from megatron_reft.models import cpu_matmul


def vocab_logits(output_layer, hidden: torch.Tensor, weight: torch.Tensor | None,
                 gather_output: bool = False) -> torch.Tensor:
    """hidden [..., h] → logits [..., V/TP] (all of V with `gather_output`), as
    `output_layer(hidden, weight=weight)` computes them (`weight` None: the layer's own; given:
    the tied embedding)."""
    matrix = weight if weight is not None else output_layer.weight
    if not _takes_onednn(output_layer, hidden, matrix):
        return output_layer(hidden, weight=weight, runtime_gather_output=gather_output)[0]
    if torch.is_grad_enabled() and (hidden.requires_grad or matrix.requires_grad):
        return cpu_matmul.linear_with_grad(hidden, matrix, None, False, None)
    return cpu_matmul.linear(hidden, matrix)


def _takes_onednn(output_layer, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    from megatron.core import parallel_state as ps

    config = getattr(output_layer, "config", None)
    return (cpu_matmul.takes_onednn(hidden.numel() // hidden.shape[-1], weight, hidden)
            and getattr(output_layer, "bias", None) is None
            and not getattr(config, "gradient_accumulation_fusion", False)
            and not getattr(config, "defer_embedding_wgrad_compute", False)
            and ps.get_tensor_model_parallel_world_size() == 1)

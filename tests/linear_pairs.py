"""megatron's column- and row-parallel linears next to ours (models/inference_linear.py), with
the same random weights: for tests that compare the two."""
from __future__ import annotations

import torch


def paired_linears(config, width: int, inner: int, bias: bool, skip_bias_add: bool, generator: torch.Generator):
    """[(megatron's, ours) column-parallel width → inner, (megatron's, ours) row-parallel inner →
    width]; inputs are TP-local (gather_output False, input_is_parallel True)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_reft.models.inference_linear import InferenceColumnParallelLinear, InferenceRowParallelLinear

    common = dict(config=config, init_method=torch.nn.init.normal_, bias=bias, skip_bias_add=skip_bias_add)
    pairs = [tuple(cls(width, inner, gather_output=False, **common)
                   for cls in (ColumnParallelLinear, InferenceColumnParallelLinear)),
             tuple(cls(inner, width, input_is_parallel=True, **common)
                   for cls in (RowParallelLinear, InferenceRowParallelLinear))]
    for theirs, ours in pairs:
        with torch.no_grad():
            for a, b in zip(theirs.parameters(), ours.parameters()):
                a.normal_(generator=generator)
                b.copy_(a)
    return pairs

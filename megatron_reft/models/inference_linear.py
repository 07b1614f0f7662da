"""megatron-core's tensor-parallel linears with a lean forward when no gradient is recorded, and
their matmuls on oneDNN on CPU where that kernel is faster (models/cpu_matmul.py).

A forward through megatron's `ColumnParallelLinear` / `RowParallelLinear` passes three
autograd Functions (copy-to-TP-region, the linear with gradient-accumulation hooks, reduce-from-
TP-region), a custom-autocast decorator and several group lookups: on a decode step, where every
matmul is one token per row, that host-side work is most of a layer's time (CPU proxy of the
H200 run in docs/benchmarks.md: the engine's decode step took twice HF's, and cProfile puts the
linears' wrappers at ~20 % of it). Without autograd none of it does anything: the forward is
`input @ weightᵀ (+ bias)` and, for a row-parallel layer under TP > 1, the all-reduce.

These subclasses keep megatron's constructors (weights, TP split, `skip_bias_add`, the
checkpoint layout) and run that arithmetic directly whenever gradients are off; training,
sequence parallelism, gathered outputs, expert communication and deferred embedding gradients
take megatron's own forward. Either way the product itself is `cpu_matmul`'s choice: in
training megatron's `_forward_impl` (its linear autograd Function) is replaced by
`cpu_matmul.linear_with_grad` for the plain case (CPU fp32, a trainable weight, no fused
gradient accumulation, no sequence parallelism or deferred weight gradients) when oneDNN pays
for the shape. The lean and the full forward pick the same kernel for the same shape, so they
stay bit-identical to each other.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_reft.models import cpu_matmul


def _plain_forward(layer) -> bool:
    return not torch.is_grad_enabled() and not layer.sequence_parallel and not layer.explicit_expert_comm


def _forward_impl(megatron_impl, input, weight, bias=None, gradient_accumulation_fusion=False,
                  allreduce_dgrad=False, sequence_parallel=False, grad_output_buffer=None, tp_group=None,
                  **kwargs):
    """megatron's linear autograd Function, or oneDNN's products for the plain case where they pay."""
    rows = input.numel() // input.shape[-1]
    if (weight.requires_grad and not gradient_accumulation_fusion and not sequence_parallel
            and grad_output_buffer is None and cpu_matmul.takes_onednn(rows, weight, input)):
        return cpu_matmul.linear_with_grad(input, weight, bias, allreduce_dgrad, tp_group)
    return megatron_impl(input=input, weight=weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
                         allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                         grad_output_buffer=grad_output_buffer, tp_group=tp_group, **kwargs)


class InferenceColumnParallelLinear(ColumnParallelLinear):
    def forward(self, input_, weight=None, runtime_gather_output=None):
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if (weight is not None or gather or not _plain_forward(self)
                or self.config.defer_embedding_wgrad_compute):
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        # As LinearWithGradAccumulationAndAsyncCommunication.forward: matmul, then the bias.
        output = cpu_matmul.linear(input_, self.weight)
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        return output, (self.bias if self.skip_bias_add else None)

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _forward_impl(super()._forward_impl, input, weight, *args, **kwargs)


class InferenceRowParallelLinear(RowParallelLinear):
    def forward(self, input_):
        if not self.input_is_parallel or not _plain_forward(self):
            return super().forward(input_)
        output = cpu_matmul.linear(input_, self.weight)
        if self.tp_group is not None and self.tp_group.size() > 1:  # megatron's _reduce
            torch.distributed.all_reduce(output, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None

    def _forward_impl(self, input, weight, *args, **kwargs):
        return _forward_impl(super()._forward_impl, input, weight, *args, **kwargs)

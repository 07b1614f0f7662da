"""megatron-core's tensor-parallel linears with a lean forward when no gradient is recorded.

A forward through megatron's `ColumnParallelLinear` / `RowParallelLinear` passes three
autograd Functions (copy-to-TP-region, the linear with gradient-accumulation hooks, reduce-from-
TP-region), a custom-autocast decorator and several group lookups: on a decode step, where every
matmul is one token per row, that host-side work is most of a layer's time (CPU proxy of the
H200 run in docs/benchmarks.md: the engine's decode step took twice HF's, and cProfile puts the
linears' wrappers at ~20 % of it). Without autograd none of it does anything: the forward is
`input @ weightᵀ (+ bias)` and, for a row-parallel layer under TP > 1, the all-reduce.

These subclasses keep megatron's constructors (weights, TP split, `skip_bias_add`, the
checkpoint layout) and run that arithmetic directly — the same ops in the same order, so the
outputs are bit-identical — whenever gradients are off; training, sequence parallelism, gathered
outputs, expert communication and deferred embedding gradients take megatron's own forward.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def _plain_forward(layer) -> bool:
    return not torch.is_grad_enabled() and not layer.sequence_parallel and not layer.explicit_expert_comm


class InferenceColumnParallelLinear(ColumnParallelLinear):
    def forward(self, input_, weight=None, runtime_gather_output=None):
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if (weight is not None or gather or not _plain_forward(self)
                or self.config.defer_embedding_wgrad_compute):
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        # As LinearWithGradAccumulationAndAsyncCommunication.forward: matmul, then the bias.
        output = torch.matmul(input_, self.weight.t())
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        return output, (self.bias if self.skip_bias_add else None)


class InferenceRowParallelLinear(RowParallelLinear):
    def forward(self, input_):
        if not self.input_is_parallel or not _plain_forward(self):
            return super().forward(input_)
        output = torch.matmul(input_, self.weight.t())
        if self.tp_group is not None and self.tp_group.size() > 1:  # megatron's _reduce
            torch.distributed.all_reduce(output, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None

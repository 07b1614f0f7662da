"""fp32 linear-layer matmuls on CPU through oneDNN where its kernel is faster than torch's default.

`torch.matmul` on CPU calls MKL's sgemm. PyTorch also ships oneDNN's fp32 inner product
(`torch.ops.mkldnn._linear_pointwise`, the kernel of torch.compile's CPU backend). On this
project's AMD EPYC (Zen 5) VM MKL runs the models' linear shapes at ~100–110 GFLOP/s on one
core and oneDNN at ~170–250 (forward, input gradient and weight gradient of a training
micro-batch's 4k rows; docs/benchmarks.md, "twelfth round"); on the Intel VMs of earlier
sessions oneDNN was 1.0–2.1× MKL on the output layer's shapes. For tiny products — a decode
step's few rows against a small weight — oneDNN's ~10 µs per call loses to MKL, so it is taken
only from `ONEDNN_MIN_MACS` multiply-adds up (the crossover measured on that VM: 0.76–1.07× at
0.5–1M, 1.2–1.5× at 1.5–4M, 2.3× at 100M+). Both are IEEE fp32 and sum in different orders,
so results agree to fp32 rounding (~1e-7 relative of the largest term), not bit for bit.

Users: the local spec's linears (models/inference_linear.py: forward, and the backward of
`linear_with_grad` in training) and the output layer (models/output_projection.py). GPUs, bf16
(PyTorch already routes CPU bf16 matmuls to oneDNN) and builds without the kernel (probed once
per process against `F.linear`) keep `torch.matmul`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ONEDNN_MIN_MACS = 1 << 20  # rows × out × in; below it MKL's lower call overhead wins
_onednn_works: bool | None = None


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's fp32 linear and it agrees with F.linear (probed
    on a small problem once; an ARM or stripped build keeps torch.matmul)."""
    global _onednn_works
    if _onednn_works is None:
        try:
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(5, 16, generator=g), torch.randn(24, 16, generator=g)
            _onednn_works = bool(torch.backends.mkldnn.is_available()) and torch.allclose(
                _onednn_linear(x, w), F.linear(x, w), atol=1e-5)
        except (AttributeError, RuntimeError):
            _onednn_works = False
    return _onednn_works


def takes_onednn(rows: int, weight: torch.Tensor, *others: torch.Tensor) -> bool:
    """A [rows, in] × [out, in]ᵀ product (or its gradients) runs faster on oneDNN here."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and all(t.dtype == torch.float32 for t in others)
            and rows * weight.numel() >= ONEDNN_MIN_MACS and onednn_available())


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[n, in] · [out, in]ᵀ → [n, out] (either operand may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] · weightᵀ → [..., out] without recording gradients: oneDNN where it pays,
    else `torch.matmul` as megatron's linear computes it."""
    rows = x.numel() // x.shape[-1]
    if not takes_onednn(rows, weight, x):
        return torch.matmul(x, weight.t())
    # 2-D in, 2-D out: the kernel's N-D output is a view that autograd would forbid in-place use of.
    return _onednn_linear(x.reshape(rows, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])


class _LinearWithGrad(torch.autograd.Function):
    """output [n, out] = input [n, in] · weightᵀ (+ bias) with all three products on oneDNN:
    dgrad = grad · weight (all-reduced over the TP group when megatron asks, `allreduce_dgrad`),
    wgrad = gradᵀ · input returned as the weight's gradient — what megatron's
    `LinearWithGradAccumulationAndAsyncCommunication` does without fused gradient accumulation
    or sequence parallelism. 2-D in and out: a custom Function's output that is a view could not
    be modified in place later."""

    @staticmethod
    def forward(ctx, input, weight, bias, allreduce_dgrad, tp_group):
        ctx.save_for_backward(input, weight)
        ctx.use_bias, ctx.allreduce_dgrad, ctx.tp_group = bias is not None, allreduce_dgrad, tp_group
        output = _onednn_linear(input, weight)
        return output + bias if bias is not None else output

    @staticmethod
    def backward(ctx, grad):
        input, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_input = _onednn_linear(grad, weight.t()) if needs_input else None
        handle = None
        if ctx.allreduce_dgrad and needs_input:  # overlapped with the weight gradient, as megatron does
            handle = torch.distributed.all_reduce(grad_input, group=ctx.tp_group, async_op=True)
        grad_weight = _weight_grad(grad, input) if needs_weight else None
        grad_bias = grad.sum(dim=0) if ctx.use_bias and needs_bias else None
        if handle is not None:
            handle.wait()
        return grad_input, grad_weight, grad_bias, None, None


def _weight_grad(grad: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """gradᵀ · input [out, in]. oneDNN ran it 1.2–1.4× faster with the longer of out and in as its
    weight operand (benchmarks/cpu_matmul.py's shapes), hence the transposed form when out ≥ in."""
    if grad.shape[1] >= input.shape[1]:
        return _onednn_linear(input.t(), grad.t()).t()
    return _onednn_linear(grad.t(), input.t())


def linear_with_grad(input, weight, bias, allreduce_dgrad: bool, tp_group):
    """input [..., in] → [..., out] through `_LinearWithGrad` (callers check `takes_onednn`)."""
    flat = input.reshape(-1, input.shape[-1])
    output = _LinearWithGrad.apply(flat, weight, bias, allreduce_dgrad, tp_group)
    return output.view(*input.shape[:-1], weight.shape[0])

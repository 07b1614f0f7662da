"""The output layer's matmul (hidden → vocabulary logits) with the faster CPU kernel for its shape.

megatron's `ColumnParallelLinear` multiplies with `torch.matmul`, which on CPU is MKL's sgemm.
For the output layer's shape — tens of thousands of vocabulary rows against a few (decode) to a
few hundred (scored positions of a micro-batch) hidden states — oneDNN's fp32 inner-product
kernel, which PyTorch ships for `torch.compile`'s CPU backend, measured 1.1–2.1× faster at
decode's 1–128 rows and 1.0–1.3× at 512–2048 on this project's CPUs
(`benchmarks/output_projection.py`, docs/benchmarks.md, seventh round). For small
matrices (the quickstart's 384 × 128) it is slower, so only weights of at least
`MIN_WEIGHT_ENTRIES` take it. Its backward is torch's own two matmuls (dh = g·W, dW = gᵀ·h),
which already run at the machine's matmul rate.

The oneDNN path is taken only on CPU, in fp32, with TP = 1 (tensor-parallel layouts keep
megatron's layer, whose communication is the point there) and without megatron's fused
gradient accumulation (a GPU feature). Everything else calls the output layer itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_WEIGHT_ENTRIES = 1 << 21  # vocabulary × hidden; below it MKL's sgemm is as fast or faster
_onednn_works: bool | None = None  # probed once per process


def vocab_logits(output_layer, hidden: torch.Tensor, weight: torch.Tensor | None,
                 gather_output: bool = False) -> torch.Tensor:
    """hidden [..., h] → logits [..., V/TP] (all of V with `gather_output`), as
    `output_layer(hidden, weight=weight)` computes them (`weight` None: the layer's own; given:
    the tied embedding)."""
    matrix = weight if weight is not None else output_layer.weight
    if not _takes_onednn(output_layer, hidden, matrix):
        return output_layer(hidden, weight=weight, runtime_gather_output=gather_output)[0]
    # 2-D in, 2-D out: the kernel's N-D output is a view, which autograd would forbid the
    # log-prob function to consume in place.
    flat = hidden.reshape(-1, hidden.shape[-1])
    if torch.is_grad_enabled() and (hidden.requires_grad or matrix.requires_grad):
        logits = _OneDnnProjection.apply(flat, matrix)
    else:
        logits = _onednn_linear(flat, matrix)
    return logits.view(*hidden.shape[:-1], matrix.shape[0])


def _takes_onednn(output_layer, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    from megatron.core import parallel_state as ps

    config = getattr(output_layer, "config", None)
    return (weight.device.type == "cpu" and weight.dtype == hidden.dtype == torch.float32
            and weight.numel() >= MIN_WEIGHT_ENTRIES
            and getattr(output_layer, "bias", None) is None
            and not getattr(config, "gradient_accumulation_fusion", False)
            and not getattr(config, "defer_embedding_wgrad_compute", False)
            and ps.get_tensor_model_parallel_world_size() == 1
            and onednn_available())


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's fp32 linear and it agrees with F.linear (probed
    on a small problem once; an ARM or stripped build falls back to megatron's layer)."""
    global _onednn_works
    if _onednn_works is None:
        try:
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(5, 16, generator=g), torch.randn(24, 16, generator=g)
            _onednn_works = bool(torch.backends.mkldnn.is_available()) and torch.allclose(
                torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w), atol=1e-5)
        except (AttributeError, RuntimeError):
            _onednn_works = False
    return _onednn_works


def _onednn_linear(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[n, h] · [V, h]ᵀ → [n, V]."""
    return torch.ops.mkldnn._linear_pointwise(hidden, weight, None, "none", [], "")


class _OneDnnProjection(torch.autograd.Function):
    """logits [n, V] = h · Wᵀ for h [n, h], with oneDNN's forward; backward dh = g · W and dW = gᵀ · h (torch's
    matmuls), the weight gradient left in `.grad` for megatron's DDP hook to accumulate, as
    its own layer does without fused gradient accumulation."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return _onednn_linear(hidden, weight)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight

"""SwiGLU and RoPE as single autograd nodes, for the local (non-TE) spec's training passes.

Without Transformer Engine or apex, megatron-core builds both from small tensor ops whose
backward autograd assembles piece by piece:

- the MLP's gated activation `silu(a) · (b + glu_linear_offset)` after `torch.chunk` — an extra
  full-width add of the offset 0, and a backward that concatenates the two halves' gradients
  (the chunk's backward) after computing them into separate tensors;
- RoPE `t·cos + rotate_half(t)·sin`, for the query and again for the key, with `cos` and `sin`
  recomputed from the angles per call, a concatenation for `rotate_half`, a second one with the
  (empty) pass-through channels, and their backward as slices, a negation and an accumulation.

Here each is one autograd function whose backward writes its gradient once, into the tensor it
returns. The arithmetic is megatron's, element by element — the same products and sums in the
same order — so outputs and gradients are bit-identical (tests/test_fused_elementwise.py; the
one exception is the sign of an exact zero: megatron's `b + 0` turns -0.0 into +0.0); at
the quickstart's shape the two save ~1/3 (SwiGLU) and ~1/2 (RoPE) of those ops' time
(docs/benchmarks.md, "eleventh round"). On a GPU with Transformer Engine the TE spec is used and
none of this runs; llama on a GPU without TE keeps megatron's fused SwiGLU
(`bias_activation_fusion`) and takes this RoPE.

RMSNorm (llama's `torch.nn.RMSNorm`, megatron's norm without TE or apex) is the third: on CPU
`torch.rms_norm` is a composite of pow, mean, add, rsqrt and two products whose backward autograd
assembles from ~a dozen passes over the activations. `FusedRMSNorm` keeps that forward op for op
(bit-identical outputs) and writes the backward in closed form, r·(ĝ − x̂·mean(ĝ·x̂)) with
ĝ = grad·weight, x̂ = x·r: five passes. Its gradients are a different, shorter sum, so they agree
with autograd's to fp32 rounding (~1e-7 relative), not bit for bit; it runs for CPU fp32
training passes only (CUDA has PyTorch's fused kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    """[..., 2f] → silu(a)·b [..., f] for (a, b) the halves of the last dimension."""

    @staticmethod
    def forward(ctx, gate_and_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_and_up.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(gate, up, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate, up, activated = ctx.saved_tensors
        width = gate.shape[-1]
        grad_input = grad.new_empty(*grad.shape[:-1], 2 * width)
        # d/da = grad·b·silu'(a) (torch's own silu backward), d/db = grad·silu(a): the products
        # megatron's autograd graph forms, written straight into their halves.
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_input[..., :width])
        torch.mul(grad, activated, out=grad_input[..., width:])
        return grad_input


def swiglu(gate_and_up: torch.Tensor) -> torch.Tensor:
    """silu(first half) · second half, as megatron's unfused gated MLP with `glu_linear_offset` 0."""
    if not torch.is_grad_enabled() or not gate_and_up.requires_grad:
        gate, up = gate_and_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLU.apply(gate_and_up)


def swiglu_mlp():
    """megatron's `MLP` whose gated SiLU activation is `swiglu` when the config is the plain case
    (no bias, no offset or clamp, no per-token scale, no fused/TE activation); every other
    configuration runs megatron's forward."""
    from megatron.core.transformer.mlp import MLP

    class SwiGLUMLP(MLP):
        def forward(self, hidden_states, per_token_scale=None, **kwargs):
            if per_token_scale is not None or not self._plain_swiglu():
                return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
            gate_and_up, _ = self.linear_fc1(hidden_states)
            return self.linear_fc2(swiglu(gate_and_up))

        def _plain_swiglu(self) -> bool:
            c = self.config
            return (c.gated_linear_unit and c.activation_func is F.silu and not c.add_bias_linear
                    and not c.bias_activation_fusion and not c.use_te_activation_func
                    and c.activation_func_clamp_value is None and c.glu_linear_offset == 0.0)

    return SwiGLUMLP


def rope_cos_sin(angles: torch.Tensor, mscale: float, dtype: torch.dtype):
    """(cos, sin) of the angle table as megatron's `_apply_rotary_pos_emb_bshd` forms them."""
    return (torch.cos(angles) * mscale).to(dtype), (torch.sin(angles) * mscale).to(dtype)


def rope_rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """t·cos + rotate_half(t)·sin on the first cos.shape[-1] channels (the rest passed through);
    with `transpose`, the adjoint map (the backward of the rotation) t·cos + rotate_halfᵀ(t·sin).

    rotate_half([x1, x2]) = [-x2, x1], so the rotation is [x1·c1 - x2·s1, x2·c2 + x1·s2] — the
    values megatron forms, since (-x2)·s1 = -(x2·s1) and a + (-b) = a - b exactly — and its
    adjoint [g1·c1 + g2·s2, g2·c2 - g1·s1], the sum autograd forms for megatron's graph."""
    rot_dim, half = cos.shape[-1], cos.shape[-1] // 2
    out = t * cos if rot_dim == t.shape[-1] else torch.cat((t[..., :rot_dim] * cos, t[..., rot_dim:]), dim=-1)
    first, second = out[..., :half], out[..., half:rot_dim]
    x1, x2 = t[..., :half], t[..., half:rot_dim]
    if transpose:
        first.add_(x2 * sin[..., half:])
        second.sub_(x1 * sin[..., :half])
    else:
        first.sub_(x2 * sin[..., :half])
        second.add_(x1 * sin[..., half:])
    return out


class _RotateQueryKey(torch.autograd.Function):
    """RoPE of the query [s, b, heads, dim] and the key [s, b, groups, dim] at the same positions,
    (cos, sin) [s, 1, 1, rot_dim]."""

    @staticmethod
    def forward(ctx, query, key, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_rotate(query, cos, sin), rope_rotate(key, cos, sin)

    @staticmethod
    def backward(ctx, grad_query, grad_key):
        cos, sin = ctx.saved_tensors
        return rope_rotate(grad_query, cos, sin, transpose=True), rope_rotate(grad_key, cos, sin, transpose=True), None, None


def rotate_query_key(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(query, key) rotated as megatron's unfused, non-interleaved RoPE rotates them."""
    return _RotateQueryKey.apply(query, key, cos, sin)


class _RMSNorm(torch.autograd.Function):
    """x [..., h] → x·r·weight, r = (mean(x²) + eps)^-½ over the last dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # torch.rms_norm's CPU composite, op for op (its outputs, bit for bit)
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        normed = x.mul(rstd)
        ctx.save_for_backward(normed, rstd, weight)
        return normed.mul(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, rstd, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_normed = grad * weight
            # d(x·r)/dx applied to ĝ: r·(ĝ − x̂·mean(ĝ·x̂)), since dr/dx = −r³·x/h
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = torch.addcmul(grad_normed, normed, dot, value=-1).mul_(rstd)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with the closed-form backward (`_RMSNorm`)."""
    return _RMSNorm.apply(x, weight, eps)


class FusedRMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` whose CPU fp32 training passes run `rms_norm`; everything else (no-grad
    passes, other dtypes and devices, no weight, several normalised dimensions) is torch's. Only
    `forward` changes: parameters, state-dict keys and checkpoints are torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._plain_rms_norm(x):
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps)

    def _plain_rms_norm(self, x: torch.Tensor) -> bool:
        return (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight is not None and self.weight.dtype == torch.float32
                and len(self.normalized_shape) == 1 and (x.requires_grad or self.weight.requires_grad))

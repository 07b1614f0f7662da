"""SwiGLU and RoPE as single autograd nodes (models/fused_elementwise.py) compute megatron's
numbers bit for bit: each op against megatron's own unfused function (forward and backward;
partial rotary, a YaRN-style mscale, bf16), and a whole llama training pass — loss and every
parameter's gradient — with the fused nodes against the same model with them switched off, at
TP 1 and 2 (a TP rank holds half of each SwiGLU half). The fused nodes must actually run there
(counted), or the comparison would be of megatron with itself.

RMSNorm's closed-form backward (`FusedRMSNorm`): outputs equal to torch's RMSNorm bit for bit,
gradients to fp32 rounding (float64: to 1e-12), and the same whole training pass with every norm
switched back to torch's: the same loss, gradients to fp32 rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed


def _megatron_swiglu(x: torch.Tensor) -> torch.Tensor:
    """megatron's MLP activation without bias_activation_fusion (mlp.py, `glu`)."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * (up + 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_forward_and_backward_equal_megatron_bit_for_bit(dtype):
    from megatron_reft.models.fused_elementwise import swiglu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 2 * 24, generator=g).to(dtype)
    grad = torch.randn(7, 3, 24, generator=g).to(dtype)
    ours_in, theirs_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = swiglu(ours_in), _megatron_swiglu(theirs_in)
    ours.backward(grad)
    theirs.backward(grad)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_in.grad, theirs_in.grad)
    assert ours_in.grad.abs().sum() > 0  # the gate half's gradient is written, not left empty
    with torch.no_grad():
        assert torch.equal(swiglu(x), _megatron_swiglu(x))


@pytest.mark.parametrize("rot_dim,mscale,dtype", [(16, 1.0, torch.float32), (8, 1.0, torch.float32),
                                                  (16, 1.37, torch.float32), (16, 1.0, torch.bfloat16)])
def test_rope_forward_and_backward_equal_megatron_bit_for_bit(rot_dim, mscale, dtype):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_reft.models.fused_elementwise import rope_cos_sin, rotate_query_key

    g = torch.Generator().manual_seed(1)
    s, b, heads, groups, dim = 9, 2, 4, 2, 16
    half_angles = torch.randn(s, 1, 1, rot_dim // 2, generator=g) * 3
    angles = torch.cat((half_angles, half_angles), dim=-1)  # megatron's table: each angle twice
    query, key = torch.randn(s, b, heads, dim, generator=g).to(dtype), torch.randn(s, b, groups, dim, generator=g).to(dtype)
    grad_q, grad_k = torch.randn_like(query), torch.randn_like(key)
    q1, k1 = query.clone().requires_grad_(), key.clone().requires_grad_()
    q2, k2 = query.clone().requires_grad_(), key.clone().requires_grad_()
    ours = rotate_query_key(q1, k1, *rope_cos_sin(angles, mscale, dtype))
    theirs = [_apply_rotary_pos_emb_bshd(t, angles, mscale=mscale) for t in (q2, k2)]
    torch.autograd.backward(list(ours), [grad_q, grad_k])
    torch.autograd.backward(theirs, [grad_q, grad_k])
    for a, b_ in zip(ours, theirs):
        assert torch.equal(a, b_)
    assert torch.equal(q1.grad, q2.grad) and torch.equal(k1.grad, k2.grad)
    if rot_dim < dim:  # the pass-through channels: unchanged, gradient passed straight back
        assert torch.equal(ours[0][..., rot_dim:], query[..., rot_dim:])
        assert torch.equal(q1.grad[..., rot_dim:], grad_q[..., rot_dim:])


@pytest.mark.parametrize("shape,eps", [((9, 2, 24), 1e-5), ((5, 16), None), ((3, 4, 2, 8), 1e-6)])
def test_rms_norm_outputs_equal_torch_and_gradients_match(shape, eps):
    from megatron_reft.models.fused_elementwise import FusedRMSNorm, rms_norm

    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g) * 3
    grad = torch.randn(*shape, generator=g)
    theirs = torch.nn.RMSNorm(shape[-1], eps=eps)
    ours = torch.nn.RMSNorm(shape[-1], eps=eps)
    ours.__class__ = FusedRMSNorm
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
        ours.weight.copy_(theirs.weight)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    assert out_ours.grad_fn is not None and "_RMSNorm" in type(out_ours.grad_fn).__name__  # the fused node ran
    assert torch.equal(out_ours, out_theirs)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)
    # float64: the closed form is the same derivative, not an approximation of it
    x64, w64 = x.double().requires_grad_(), theirs.weight.detach().double().requires_grad_()
    ref = torch.autograd.grad(torch.rms_norm(x64, (shape[-1],), w64, eps), (x64, w64), grad.double())
    got = torch.autograd.grad(rms_norm(x64, w64, eps if eps is not None else torch.finfo(torch.float64).eps),
                              (x64, w64), grad.double())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # no-grad passes are torch's own
        assert torch.equal(ours(x), theirs(x))


def _training_worker(rank, world):
    torch.set_num_threads(1)
    import megatron_reft.models.fused_elementwise as fused
    import megatron_reft.models.sdpa_attention as sdpa_attention
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine
    from megatron_reft.models.families import model_config_from_preset

    initialize(world, 1, seed=5)
    ran = {"swiglu": 0, "rope": 0, "rms_norm": 0}
    swiglu, rotate, norm = fused.swiglu, sdpa_attention.rotate_query_key, fused.rms_norm

    def counted_swiglu(x):
        ran["swiglu"] += torch.is_grad_enabled()
        return swiglu(x)

    def counted_rotate(*args):
        ran["rope"] += 1
        return rotate(*args)

    def counted_norm(*args):
        ran["rms_norm"] += 1
        return norm(*args)

    fused.swiglu, sdpa_attention.rotate_query_key, fused.rms_norm = counted_swiglu, counted_rotate, counted_norm
    engine = Engine(model_config_from_preset("tiny-llama", vocab_size=200))
    engine.init_from_scratch(11)
    gpt = engine.gpt
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, 200, (3, 13), generator=g)
    positions = torch.arange(13).expand(3, 13)
    labels = torch.roll(tokens, -1, dims=1)

    def loss_and_grads():
        gpt.zero_grad()
        for p in gpt.parameters():
            p.grad = None
        loss = gpt(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}

    fused_loss, fused_grads = loss_and_grads()
    counts = dict(ran)
    layers = list(gpt.decoder.layers)
    for layer in layers:  # megatron's own SwiGLU and RoPE for the same module instances
        layer.mlp._plain_swiglu = lambda: False
        layer.self_attention._plain_rope = lambda: False
    plain_loss, plain_grads = loss_and_grads()
    after = dict(ran)
    norms = [m for m in gpt.modules() if isinstance(m, fused.FusedRMSNorm)]
    for module in norms:  # and torch's RMSNorm backward (the fused norms ran in both passes above)
        module._plain_rms_norm = lambda x: False
    torch_norm_loss, torch_norm_grads = loss_and_grads()
    fused.swiglu, sdpa_attention.rotate_query_key, fused.rms_norm = swiglu, rotate, norm
    shutdown()
    close = lambda a, b: bool(torch.allclose(a, b, rtol=1e-4, atol=1e-6))
    return {"counts": counts, "layers": len(layers), "after": after, "norms": len(norms),
            "after_torch_norms": dict(ran),
            "loss_equal": bool(torch.equal(fused_loss, plain_loss)),
            "grads_equal": sorted(n for n in plain_grads if torch.equal(plain_grads[n], fused_grads[n])),
            "grad_names": sorted(plain_grads),
            "torch_norm_loss_equal": bool(torch.equal(torch_norm_loss, plain_loss)),
            "torch_norm_grads_close": sorted(n for n in plain_grads if close(torch_norm_grads[n], plain_grads[n])),
            "torch_norm_grads_equal": sum(torch.equal(torch_norm_grads[n], plain_grads[n]) for n in plain_grads)}


@pytest.mark.parametrize("tp", [1, 2])
def test_llama_training_pass_with_the_fused_nodes_equals_the_unfused_one(tp):
    """SwiGLU and RoPE on vs off: bit-identical; the norms fused vs torch's: same loss, gradients to fp32
    rounding."""
    for result in run_distributed(_training_worker, tp, init_process_group=False, timeout_s=300):
        layers, norms = result["layers"], result["norms"]
        assert norms == 2 * layers + 1  # each layer's two and the final norm
        assert result["counts"] == {"swiglu": layers, "rope": layers, "rms_norm": norms}
        # switched off: megatron's SwiGLU and RoPE ran instead (the norms stayed fused)
        assert result["after"] == {"swiglu": layers, "rope": layers, "rms_norm": 2 * norms}
        assert result["after_torch_norms"] == result["after"]  # then torch's norms ran
        assert result["torch_norm_loss_equal"]  # the norm's forward is torch's, op for op
        assert result["torch_norm_grads_close"] == result["grad_names"]
        assert result["torch_norm_grads_equal"] < len(result["grad_names"])  # a different backward did run
        assert result["loss_equal"]
        assert result["grad_names"] and result["grads_equal"] == result["grad_names"]

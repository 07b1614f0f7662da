"""SwiGLU and RoPE as single autograd nodes (models/fused_elementwise.py) compute megatron's
numbers bit for bit: each op against megatron's own unfused function (forward and backward;
partial rotary, a YaRN-style mscale, bf16), and a whole llama training pass — loss and every
parameter's gradient — with the fused nodes against the same model with them switched off, at
TP 1 and 2 (a TP rank holds half of each SwiGLU half). The fused nodes must actually run there
(counted), or the comparison would be of megatron with itself."""
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


def _training_worker(rank, world):
    torch.set_num_threads(1)
    import megatron_reft.models.fused_elementwise as fused
    import megatron_reft.models.sdpa_attention as sdpa_attention
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine
    from megatron_reft.models.families import model_config_from_preset

    initialize(world, 1, seed=5)
    ran = {"swiglu": 0, "rope": 0}
    swiglu, rotate = fused.swiglu, sdpa_attention.rotate_query_key

    def counted_swiglu(x):
        ran["swiglu"] += torch.is_grad_enabled()
        return swiglu(x)

    def counted_rotate(*args):
        ran["rope"] += 1
        return rotate(*args)

    fused.swiglu, sdpa_attention.rotate_query_key = counted_swiglu, counted_rotate
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
    fused.swiglu, sdpa_attention.rotate_query_key = swiglu, rotate
    shutdown()
    return {"counts": counts, "layers": len(layers), "after": dict(ran),
            "loss_equal": bool(torch.equal(fused_loss, plain_loss)),
            "grads_equal": sorted(n for n in plain_grads if torch.equal(plain_grads[n], fused_grads[n])),
            "grad_names": sorted(plain_grads)}


@pytest.mark.parametrize("tp", [1, 2])
def test_llama_training_pass_is_bit_identical_with_the_fused_nodes(tp):
    for result in run_distributed(_training_worker, tp, init_process_group=False, timeout_s=300):
        assert result["counts"] == {"swiglu": result["layers"], "rope": result["layers"]}
        assert result["after"] == result["counts"]  # switched off: megatron's path ran instead
        assert result["loss_equal"]
        assert result["grad_names"] and result["grads_equal"] == result["grad_names"]

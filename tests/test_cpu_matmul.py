"""oneDNN's fp32 matmuls for the linears on CPU (models/cpu_matmul.py, models/inference_linear.py):
the kernel rule, and megatron's column- and row-parallel linears with our `_forward_impl` against
megatron's own at a shape above the threshold — outputs, input, weight and bias gradients to fp32
rounding at TP 1 and 2 (column-parallel: the input gradient all-reduced over the TP group), the
no-grad lean forward bit-identical to the training forward, and oneDNN actually called. Small
shapes keep MKL (tests/test_speed_paths.py checks those bit for bit against megatron's)."""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from linear_pairs import paired_linears


def test_rule_takes_onednn_from_the_threshold_in_fp32_on_cpu_only():
    from megatron_reft.models import cpu_matmul

    assert cpu_matmul.onednn_available(), "this x86 PyTorch build ships oneDNN's fp32 linear"
    weight = torch.zeros(256, 128)
    rows_at_threshold = cpu_matmul.ONEDNN_MIN_MACS // weight.numel()
    assert cpu_matmul.takes_onednn(rows_at_threshold, weight)
    assert not cpu_matmul.takes_onednn(rows_at_threshold - 1, weight)
    assert not cpu_matmul.takes_onednn(1 << 20, weight.bfloat16())
    assert not cpu_matmul.takes_onednn(1 << 20, weight, torch.zeros(1, 128, dtype=torch.float64))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_with_grad_equals_torch_and_allows_in_place_use(bias):
    from megatron_reft.models.cpu_matmul import linear, linear_with_grad

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 128, generator=g, requires_grad=True)
    w = torch.randn(256, 128, generator=g, requires_grad=True)
    b = torch.randn(256, generator=g, requires_grad=True) if bias else None
    ours = linear_with_grad(x, w, b, False, None)
    theirs = torch.nn.functional.linear(x, w, b)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(linear(x, w) + (b if bias else 0), ours)  # the no-grad path: the same kernel
    upstream = torch.randn(theirs.shape, generator=g)
    ours = ours * 1.0
    ours.mul_(2.0)  # consumers may modify the output in place (a custom Function's view could not be)
    inputs = (x, w, b) if bias else (x, w)
    for a, c in zip(torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(2.0 * theirs, inputs, upstream)):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-3)


def test_in_place_weight_updates_are_seen_by_the_next_product():
    """An optimizer steps the weights in place between calls; a kernel that kept a reordered copy
    of the weight keyed by its address would keep computing with the old values."""
    from megatron_reft.models.cpu_matmul import linear, linear_with_grad, takes_onednn

    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 128, generator=g)
    w = torch.randn(384, 128, generator=g, requires_grad=True)
    assert takes_onednn(x.shape[0], w)
    for _ in range(3):
        with torch.no_grad():
            assert torch.allclose(linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
        assert torch.allclose(linear_with_grad(x, w, None, False, None), x @ w.t(), rtol=1e-5, atol=1e-4)
        with torch.no_grad():
            w.add_(torch.randn(w.shape, generator=g))


def _linears_worker(rank, world):
    torch.set_num_threads(1)
    from megatron.core.transformer import TransformerConfig

    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.models import cpu_matmul

    initialize(world, 1, seed=0)
    assert cpu_matmul.onednn_available()  # probed (one kernel call) before counting
    calls = {"onednn": 0}
    kernel = cpu_matmul._onednn_linear

    def counted(*args):
        calls["onednn"] += 1
        return kernel(*args)

    cpu_matmul._onednn_linear = counted
    config = TransformerConfig(num_layers=1, hidden_size=256, num_attention_heads=4, use_cpu_initialization=True,
                               tensor_model_parallel_size=world)
    g = torch.Generator().manual_seed(7)  # the same on every rank: the full input is replicated
    worst = 0.0
    for bias in (False, True):
        for theirs, ours in paired_linears(config, 256, 2048, bias, False, g):
            x = torch.randn(5, 3, theirs.weight.shape[1], generator=g)
            before = calls["onednn"]
            with torch.no_grad():
                lean = ours(x)[0]
            x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_ours, out_theirs = ours(x_ours)[0], theirs(x_theirs)[0]
            assert torch.equal(lean, out_ours)  # the same kernel with and without autograd
            upstream = torch.randn(out_theirs.shape, generator=g)
            (out_ours * upstream).sum().backward()
            (out_theirs * upstream).sum().backward()
            assert calls["onednn"] - before == 4  # lean forward, forward, input and weight gradients
            pairs_checked = [(out_ours, out_theirs), (x_ours.grad, x_theirs.grad), (ours.weight.grad, theirs.weight.grad)]
            if bias:
                pairs_checked.append((ours.bias.grad, theirs.bias.grad))
            for a, b in pairs_checked:
                worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    cpu_matmul._onednn_linear = kernel
    shutdown()
    return worst


@pytest.mark.parametrize("world", [1, 2])
def test_linears_on_onednn_equal_megatron_linears(world):
    for worst in run_distributed(_linears_worker, world, init_process_group=False, timeout_s=180):
        assert worst < 1e-5, worst

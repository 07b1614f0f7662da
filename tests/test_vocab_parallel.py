"""vocab_parallel.token_logprobs_and_entropy against a plain full-vocabulary torch.log_softmax.

The padded vocabulary (rows added for TP divisibility) must never reach the softmax: the fake
output layer below writes huge logits into the padded columns, and the log-probs, entropy and
gradients must still equal the unpadded float64 reference. Chunked (one position per chunk) and
unchunked computations must agree, with and without autograd, at TP=1 and TP=2 (each rank holds
half of the padded vocabulary; rank 1's half is partly padding).
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

TRUE_VOCAB, PADDED_VOCAB, HIDDEN, SEQ, BATCH = 100, 128, 16, 10, 3
TOL = 1e-5



@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_child():
    """Spawned ranks inherit this; they also call torch.set_num_threads(1) themselves."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


class _GarbagePaddingOutputLayer:
    """Stands in for megatron's ColumnParallelLinear: logits = h · Wᵀ for this rank's rows, with
    padded columns overwritten by huge values (whatever sits in padding must not matter). Like
    the real layer, its input goes through megatron's copy-to-TP-region (backward all-reduces
    the input gradient over the TP group)."""

    def __init__(self, first_column: int):
        self.first_column = first_column

    def __call__(self, hidden, weight, runtime_gather_output=False):
        assert not runtime_gather_output  # log-probs stay vocab-parallel
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        logits = copy_to_tensor_model_parallel_region(hidden) @ weight.t()
        columns = torch.arange(self.first_column, self.first_column + weight.shape[0])
        return logits.masked_fill(columns >= TRUE_VOCAB, 1e4), None


def _inputs():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=g)
    labels = torch.randint(0, TRUE_VOCAB, (BATCH, SEQ), generator=g)
    return hidden, weight, labels


def _reference(hidden, weight, labels, temperature=1.0):
    """float64 full-vocabulary log-softmax over the TRUE vocabulary only."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logits = (h @ w[:TRUE_VOCAB].t()) / temperature  # [s, b, V]
    logp = torch.log_softmax(logits, dim=-1)
    token = logp.gather(-1, labels.t()[..., None]).squeeze(-1).t()  # [b, s]
    entropy = -(logp.exp() * logp).sum(-1).t()
    grad, weight_grad = torch.autograd.grad(token.sum(), (h, w))  # padded rows: 0
    return token.detach(), entropy.detach(), (grad, weight_grad)


def _worker(rank, world_size):
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    from megatron_reft.distributed import init as dist_init
    from megatron_reft.models.vocab_parallel import mask_padding, token_logprobs_and_entropy

    dist_init.initialize(world_size, 1, seed=1)
    hidden, weight, labels = _inputs()
    local_rows = PADDED_VOCAB // world_size
    tp_rank = ps.get_tensor_model_parallel_rank()
    local_weight = weight[tp_rank * local_rows:(tp_rank + 1) * local_rows]
    layer = _GarbagePaddingOutputLayer(tp_rank * local_rows)
    ref_lp, ref_ent, (ref_grad, ref_weight_grad) = _reference(hidden, weight, labels)
    ref_weight_grad = ref_weight_grad[tp_rank * local_rows:(tp_rank + 1) * local_rows].float()

    def compute(chunk_tokens, grad: bool, temperature=1.0):
        h = hidden.clone().requires_grad_(grad)
        w = local_weight.clone().requires_grad_(grad)
        lp, ent = token_logprobs_and_entropy(h, labels, layer, w, TRUE_VOCAB,
                                             chunk_tokens=chunk_tokens, temperature=temperature)
        g = torch.autograd.grad(lp.sum(), (h, w)) if grad else None
        return lp.detach(), ent.detach(), g

    results = {}
    for name, chunk in (("unchunked", 10_000), ("chunked", BATCH)):  # chunked: one position per chunk
        for grad in (False, True):
            lp, ent, g = compute(chunk, grad)
            assert lp.shape == ent.shape == (BATCH, SEQ)
            assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
            assert (lp - ref_lp).abs().max() <= TOL, (name, grad)
            assert (ent - ref_ent).abs().max() <= TOL, (name, grad)
            if grad:  # d log p / dz = onehot − p, through the output layer to h and W
                assert (g[0] - ref_grad).abs().max() <= TOL, name
                assert (g[1] - ref_weight_grad).abs().max() <= TOL, name
            results[(name, grad)] = (lp, ent)
    # chunking changes nothing but the matmul shapes (fp32 rounding: a few ulps of |log p| ~ 10)
    for grad in (False, True):
        a, b = results[("unchunked", grad)], results[("chunked", grad)]
        assert (a[0] - b[0]).abs().max() <= TOL and (a[1] - b[1]).abs().max() <= TOL
    # sampling temperature divides the logits before the softmax
    t_lp, t_ent, _ = _reference(hidden, weight, labels, temperature=0.7)
    lp, ent, _ = compute(4, False, temperature=0.7)
    assert (lp - t_lp).abs().max() <= TOL and (ent - t_ent).abs().max() <= TOL
    # mask_padding: only this rank's padded columns change
    raw = layer(hidden, local_weight)[0]
    masked = mask_padding(raw, TRUE_VOCAB)
    is_pad = torch.arange(tp_rank * local_rows, (tp_rank + 1) * local_rows) >= TRUE_VOCAB
    assert torch.equal(masked[..., ~is_pad], raw[..., ~is_pad])
    assert bool((masked[..., is_pad] < -1e29).all())
    dist_init.shutdown()
    return {"padding_columns_here": int(is_pad.sum())}


@pytest.mark.parametrize("tp", [1, 2])
def test_logprobs_entropy_match_full_vocab_log_softmax(tp):
    results = run_distributed(_worker, tp, init_process_group=False, timeout_s=180)
    pads = [r["padding_columns_here"] for r in results]
    assert pads == ([28] if tp == 1 else [0, 28])  # padding only in the last rank's slice

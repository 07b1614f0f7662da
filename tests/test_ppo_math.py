"""Tests for megatron_reft.rl.ppo_math (reft.md §4).

Each function is checked (1) on a small example worked out by hand in the comments and (2)
against a plain loop-over-tokens implementation written here, on random masked batches that
contain a zero-length and a full-length sequence, with NaN in every padded position (the
functions must never read them).
"""
import math
import random

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from megatron_reft.rl import ppo_math as pm

PAD = float("nan")


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol, rtol=1e-5,
    )


def random_batch(seed, B=7, T=9, contiguous=True, shift=0.0):
    """Random float32 PPO tensors; row 0 has no actions and row 1 is full length. With
    ``contiguous=False`` the mask has gaps and left padding."""
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        lengths = [0, T] + torch.randint(1, T + 1, (B - 2,), generator=g).tolist()
        mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    else:
        mask = (torch.rand(B, T, generator=g) < 0.6).float()
        mask[0] = 0.0
        mask[1] = 1.0

    def noise(scale=1.0, offset=0.0):
        x = offset + scale * torch.randn(B, T, generator=g)
        return torch.where(mask.bool(), x, PAD)

    logprobs_old = noise(0.5, -1.0)
    return dict(
        mask=mask,
        scores=torch.tensor([random.Random(seed + b).choice([0.0, 0.1, 1.0]) for b in range(B)]),
        logprobs=logprobs_old + noise(0.3),  # ratios spread around 1, some clipped
        logprobs_old=logprobs_old,
        logprobs_ref=noise(0.5, -1.0),
        values=noise(1.0, shift),
        values_old=noise(1.0, shift),
        returns=noise(1.0, shift),
        advantages=noise(2.0, shift),
    )


def actions(mask_row):
    return [t for t, m in enumerate(mask_row.tolist()) if m]


def finite_and_zero_padded(x, mask):
    assert torch.isfinite(x).all()
    assert (x[~mask.bool()] == 0).all()


# ---------------------------------------------------------------------------------------------
# plain loop-over-tokens references (float64 Python arithmetic)


def loop_kl_rewards(scores, lp_old, lp_ref, mask, beta):
    B, T = mask.shape
    rewards, kl = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = actions(mask[b])
        for t in idx:
            kl[b][t] = lp_old[b, t].item() - lp_ref[b, t].item()
            rewards[b][t] = -beta * kl[b][t] + (scores[b].item() if t == idx[-1] else 0.0)
    return rewards, kl


def loop_gae(rewards, values, mask, gamma, lam):
    B, T = mask.shape
    adv, ret = [[0.0] * T for _ in range(B)], [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = actions(mask[b])
        next_value, next_adv = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b][t] + gamma * next_value - values[b, t].item()
            adv[b][t] = delta + gamma * lam * next_adv
            ret[b][t] = adv[b][t] + values[b, t].item()
            next_value, next_adv = values[b, t].item(), adv[b][t]
    return adv, ret


def loop_whiten(advantages, mask, eps=1e-8):
    xs = [advantages[b, t].item() for b in range(mask.shape[0]) for t in actions(mask[b])]
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    out = [[0.0] * mask.shape[1] for _ in range(mask.shape[0])]
    for b in range(mask.shape[0]):
        for t in actions(mask[b]):
            out[b][t] = (advantages[b, t].item() - mean) / math.sqrt(var + eps)
    return out


def loop_sequence_mean(per_token, mask):
    means = [sum(per_token[b][t] for t in actions(mask[b])) / len(actions(mask[b]))
             for b in range(mask.shape[0]) if actions(mask[b])]
    return sum(means) / len(means)


def loop_policy(lp, lp_old, adv, mask, eps):
    B, T = mask.shape
    per_token = [[0.0] * T for _ in range(B)]
    ratios, clipped, kl = [], 0, 0.0
    for b in range(B):
        for t in actions(mask[b]):
            r = math.exp(lp[b, t].item() - lp_old[b, t].item())
            a = adv[b, t].item()
            plain, clip = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            per_token[b][t] = max(plain, clip)
            clipped += clip > plain
            ratios.append(r)
            kl += 0.5 * (lp[b, t].item() - lp_old[b, t].item()) ** 2
    n = len(ratios)
    stats = dict(clip_fraction=clipped / n, ratio_mean=sum(ratios) / n,
                 ratio_max=max(ratios), approx_kl=kl / n)
    return loop_sequence_mean(per_token, mask), stats


def loop_value(v, v_old, ret, mask, clip_range):
    B, T = mask.shape
    per_token = [[0.0] * T for _ in range(B)]
    clipped, n = 0, 0
    for b in range(B):
        for t in actions(mask[b]):
            vc = v_old[b, t].item() + min(max(v[b, t].item() - v_old[b, t].item(), -clip_range), clip_range)
            plain, clip = (v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2
            per_token[b][t] = 0.5 * max(plain, clip)
            clipped, n = clipped + (clip > plain), n + 1
    return loop_sequence_mean(per_token, mask), dict(value_clip_fraction=clipped / n)


# ---------------------------------------------------------------------------------------------
# masked reductions


def test_masked_reductions_by_hand():
    x = torch.tensor([[1.0, 2.0, PAD], [3.0, PAD, PAD], [PAD, PAD, PAD]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [0, 0, 0]])
    close(pm.masked_sum(x, mask), 6.0)
    close(pm.masked_mean(x, mask), 2.0)
    close(pm.masked_mean(x, mask, dim=1), [1.5, 3.0, 0.0])  # empty row: 0, not NaN
    close(pm.masked_var(x, mask), 1.0)  # ((1-2)² + 0 + (3-2)²) / (3 - 1)
    close(pm.masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    close(pm.count_sequences(mask), 2)
    # per-sequence means 1.5 and 3.0; the empty row is excluded -> (1.5 + 3) / 2
    close(pm.sequence_mean(x, mask), 2.25)
    close(pm.sequence_mean(x, mask, num_sequences=3), 4.5 / 3)
    assert pm.masked_mean(x, torch.zeros_like(mask)) == 0.0


def test_last_action_mask_any_layout():
    mask = torch.tensor([[1.0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    expected = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]).bool()
    assert torch.equal(pm.last_action_mask(mask), expected)


# ---------------------------------------------------------------------------------------------
# KL-penalised rewards


def test_kl_rewards_by_hand():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    lp_old = torch.tensor([[-1.0, -2.0, -0.5, PAD], [-0.7, PAD, PAD, PAD], [PAD] * 4])
    lp_ref = torch.tensor([[-1.5, -1.0, -2.5, PAD], [-1.0, PAD, PAD, PAD], [PAD] * 4])
    scores = torch.tensor([1.0, 0.1, 1.0])
    rewards, kl = pm.kl_penalized_rewards(scores, lp_old, lp_ref, mask, kl_coef=0.1)
    # row 0: kl = [0.5, -1.0, 2.0]; r = -0.1·kl, plus score 1.0 on the last action
    #        -> [-0.05, 0.1, -0.2 + 1.0 = 0.8]
    # row 1: kl = [0.3]; r = -0.03 + 0.1 = 0.07.  row 2: no actions, score dropped.
    close(kl, [[0.5, -1.0, 2.0, 0], [0.3, 0, 0, 0], [0, 0, 0, 0]])
    close(rewards, [[-0.05, 0.1, 0.8, 0], [0.07, 0, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_kl_rewards_against_loop(seed, contiguous):
    d = random_batch(seed, contiguous=contiguous)
    rewards, kl = pm.kl_penalized_rewards(d["scores"], d["logprobs_old"], d["logprobs_ref"], d["mask"], 0.05)
    ref_rewards, ref_kl = loop_kl_rewards(d["scores"], d["logprobs_old"], d["logprobs_ref"], d["mask"], 0.05)
    close(rewards, ref_rewards)
    close(kl, ref_kl)
    finite_and_zero_padded(rewards, d["mask"])


# ---------------------------------------------------------------------------------------------
# GAE


def test_gae_by_hand():
    mask = torch.tensor([[1.0, 1, 1, 0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, PAD]])
    # γ = 1, λ = 0.5; value after the last action = 0:
    #   δ2 = 1 + 0 − 0.5 = 0.5           A2 = 0.5
    #   δ1 = 0 + 0.5 − 0.25 = 0.25       A1 = 0.25 + 0.5·0.5 = 0.5
    #   δ0 = 0 + 0.25 − 0.5 = −0.25      A0 = −0.25 + 0.5·0.5 = 0
    #   returns = A + V = [0.5, 0.75, 1.0]
    adv, ret = pm.gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    close(adv, [[0.0, 0.5, 0.5, 0.0]])
    close(ret, [[0.5, 0.75, 1.0, 0.0]])
    # defaults γ = 1, λ = 0.95: A2 = 0.5, A1 = 0.25 + 0.95·0.5 = 0.725, A0 = −0.25 + 0.95·0.725 = 0.43875
    adv, ret = pm.gae_advantages(rewards, values, mask)
    close(adv, [[0.43875, 0.725, 0.5, 0.0]])
    close(ret, [[0.93875, 0.975, 1.0, 0.0]])
    # λ = 1, γ = 1: returns are the undiscounted reward-to-go, [1, 1, 1]
    _, ret = pm.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    close(ret, [[1.0, 1.0, 1.0, 0.0]])
    # γ = 0.5, λ = 1 (γ acts inside δ and in the decay): δ2 = 0.5, δ1 = 0 + 0.5·0.5 − 0.25 = 0,
    # δ0 = 0 + 0.5·0.25 − 0.5 = −0.375; A1 = 0 + 0.5·0.5 = 0.25, A0 = −0.375 + 0.5·0.25 = −0.25
    adv, _ = pm.gae_advantages(rewards, values, mask, gamma=0.5, lam=1.0)
    close(adv, [[-0.25, 0.25, 0.5, 0.0]])


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_gae_against_loop(seed, contiguous):
    d = random_batch(seed, contiguous=contiguous)
    rewards, _ = pm.kl_penalized_rewards(d["scores"], d["logprobs_old"], d["logprobs_ref"], d["mask"], 0.05)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8)]:
        adv, ret = pm.gae_advantages(rewards, d["values"], d["mask"], gamma, lam)
        ref_adv, ref_ret = loop_gae(rewards.tolist(), d["values"], d["mask"], gamma, lam)
        close(adv, ref_adv)
        close(ret, ref_ret)
        finite_and_zero_padded(adv, d["mask"])
        finite_and_zero_padded(ret, d["mask"])


# ---------------------------------------------------------------------------------------------
# whitening


def test_whiten_by_hand():
    adv = torch.tensor([[1.0, 2.0, PAD], [3.0, PAD, PAD], [PAD, PAD, PAD]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0], [0, 0, 0]])
    # mean 2, unbiased var ((−1)² + 0² + 1²) / 2 = 1 -> (A − 2) / sqrt(1 + 1e-8)
    # (the biased variance 2/3 would give ±1.2247 instead)
    close(pm.whiten_advantages(adv, mask), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_whiten_against_loop(seed, contiguous):
    d = random_batch(seed, contiguous=contiguous, shift=3.0)
    white = pm.whiten_advantages(d["advantages"], d["mask"])
    close(white, loop_whiten(d["advantages"], d["mask"]))
    finite_and_zero_padded(white, d["mask"])
    close(pm.masked_mean(white, d["mask"]), 0.0)  # mean is not added back
    close(pm.masked_var(white, d["mask"]), 1.0, atol=1e-4)


def _whiten_on_rank(rank, world_size, batches):
    adv, mask = batches[rank]
    return (
        pm.whiten_advantages(adv, mask, group=dist.group.WORLD),
        pm.whiten_advantages(adv, mask, group=None),  # group=None: local tokens only
    )


def test_whiten_over_two_gloo_ranks_equals_concatenated_batch():
    # ranks hold differently sized batches from different distributions; rank 1 has more rows
    a, b = random_batch(10, B=3, shift=0.0), random_batch(11, B=5, shift=4.0)
    batches = [(a["advantages"], a["mask"]), (b["advantages"], b["mask"])]
    results = run_distributed(_whiten_on_rank, 2, batches, timeout_s=60)

    adv = torch.cat([a["advantages"], b["advantages"]])
    mask = torch.cat([a["mask"], b["mask"]])
    expected = pm.whiten_advantages(adv, mask)
    close(torch.cat([results[0][0], results[1][0]]), expected)
    close(torch.cat([results[0][0], results[1][0]]), loop_whiten(adv, mask))
    for rank, (adv_r, mask_r) in enumerate(batches):
        local = pm.whiten_advantages(adv_r, mask_r)
        close(results[rank][1], local)
        # the group matters: whitening per rank gives a different answer
        assert (results[rank][0] - local).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------
# losses


def test_policy_loss_by_hand():
    ln = math.log
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]])
    logprobs_old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, PAD, PAD], [PAD] * 3])
    logprobs = logprobs_old + torch.tensor([[ln(1.5), ln(0.5), 0.0], [ln(1.1), 0, 0], [0, 0, 0]])
    adv = torch.tensor([[1.0, -1.0, 2.0], [1.0, PAD, PAD], [PAD] * 3])
    # ε = 0.2. Row 0:
    #   ratio 1.5, A = 1:  −1.5 vs −1.2 (clipped)  -> −1.2, clip active
    #   ratio 0.5, A = −1:  0.5 vs  0.8 (clipped)  ->  0.8, clip active
    #   ratio 1.0, A = 2:  −2.0 vs −2.0            -> −2.0
    #   row mean (−1.2 + 0.8 − 2) / 3 = −0.8
    # Row 1: ratio 1.1 inside [0.8, 1.2], A = 1 -> −1.1.  Row 2: no actions, excluded.
    # loss = (−0.8 − 1.1) / 2 = −0.95   (a token mean would give −3.5 / 4 = −0.875)
    loss, stats = pm.policy_loss(logprobs, logprobs_old, adv, mask, clip_eps=0.2)
    close(loss, -0.95)
    close(stats["clip_fraction"], 2 / 4)
    close(stats["ratio_mean"], (1.5 + 0.5 + 1.0 + 1.1) / 4)
    close(stats["ratio_max"], 1.5)
    close(stats["approx_kl"], 0.5 * (ln(1.5) ** 2 + ln(0.5) ** 2 + 0 + ln(1.1) ** 2) / 4)


def test_value_loss_by_hand():
    mask = torch.tensor([[1.0, 1, 0], [0, 0, 0]])
    values_old = torch.tensor([[1.0, 1.0, PAD], [PAD] * 3])
    values = torch.tensor([[1.5, 0.9, PAD], [PAD] * 3])
    returns = torch.tensor([[2.0, 0.0, PAD], [PAD] * 3])
    # t0: V − V_old = 0.5 -> clipped to 0.2, V_clip = 1.2; (1.5 − 2)² = 0.25 < (1.2 − 2)² = 0.64
    #     -> 0.5·0.64 = 0.32, clip active
    # t1: V − V_old = −0.1 (inside), V_clip = 0.9; both (0.9 − 0)² = 0.81 -> 0.405
    # loss = (0.32 + 0.405) / 2 = 0.3625; the empty row is excluded
    loss, stats = pm.value_loss(values, values_old, returns, mask, clip_range=0.2)
    close(loss, 0.3625)
    close(stats["value_clip_fraction"], 0.5)


def test_ppo_loss_combines_with_vf_coef_5():
    d = random_batch(3)
    args = (d["logprobs"], d["logprobs_old"], d["values"], d["values_old"], d["advantages"],
            d["returns"], d["mask"])
    total, stats = pm.ppo_loss(*args, entropy=d["values"].abs())
    pg, _ = pm.policy_loss(d["logprobs"], d["logprobs_old"], d["advantages"], d["mask"])
    vf, _ = pm.value_loss(d["values"], d["values_old"], d["returns"], d["mask"])
    close(total, pg + 5.0 * vf)
    close(stats["policy_loss"], pg)
    close(stats["value_loss"], vf)
    close(stats["entropy"], pm.masked_mean(d["values"].abs(), d["mask"]))
    assert {"clip_fraction", "ratio_mean", "ratio_max", "approx_kl", "value_clip_fraction"} <= set(stats)


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_losses_against_loop(seed, contiguous):
    d = random_batch(seed, contiguous=contiguous)
    logprobs = d["logprobs"].clone().requires_grad_()
    values = d["values"].clone().requires_grad_()
    pg, pg_stats = pm.policy_loss(logprobs, d["logprobs_old"], d["advantages"], d["mask"], 0.2)
    vf, vf_stats = pm.value_loss(values, d["values_old"], d["returns"], d["mask"], 0.2)
    ref_pg, ref_pg_stats = loop_policy(d["logprobs"], d["logprobs_old"], d["advantages"], d["mask"], 0.2)
    ref_vf, ref_vf_stats = loop_value(d["values"], d["values_old"], d["returns"], d["mask"], 0.2)
    close(pg, ref_pg)
    close(vf, ref_vf)
    for key, value in {**ref_pg_stats, **ref_vf_stats}.items():
        close({**pg_stats, **vf_stats}[key], value)
    assert 0 < pg_stats["clip_fraction"] < 1 and 0 < vf_stats["value_clip_fraction"] < 1
    # NaN in the padding must not reach the gradients either
    (pg + vf).backward()
    finite_and_zero_padded(logprobs.grad, d["mask"])
    finite_and_zero_padded(values.grad, d["mask"])


def test_micro_batch_losses_sum_to_mini_batch_loss():
    d = random_batch(5, B=8)
    num_sequences = pm.count_sequences(d["mask"])
    keys = ["logprobs", "logprobs_old", "values", "values_old", "advantages", "returns", "mask"]

    def loss_and_grads(rows, **kw):
        args = [d[k][rows].clone() for k in keys]
        args[0].requires_grad_()
        args[2].requires_grad_()
        loss, _ = pm.ppo_loss(*args, **kw)
        loss.backward()
        return loss, args[0].grad, args[2].grad

    full, full_lp_grad, full_v_grad = loss_and_grads(slice(None))
    parts = [loss_and_grads(rows, num_sequences=num_sequences)
             for rows in (slice(0, 3), slice(3, 5), slice(5, 8))]  # first part holds the empty row
    close(sum(p[0] for p in parts), full)
    close(torch.cat([p[1] for p in parts]), full_lp_grad)
    close(torch.cat([p[2] for p in parts]), full_v_grad)
    # without num_sequences each micro-batch averages over its own sequences: not the same
    naive = sum(loss_and_grads(rows)[0] for rows in (slice(0, 3), slice(3, 5), slice(5, 8)))
    assert abs(naive.item() - full.item()) > 1e-3


# ---------------------------------------------------------------------------------------------
# statistics


def test_explained_variance_by_hand():
    mask = torch.tensor([[1.0, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, PAD]])
    values = torch.tensor([[1.0, 2.0, 2.0, PAD]])
    # Var(R) = 1; R − V = [0, 0, 1], mean 1/3, Var = (1/9 + 1/9 + 4/9) / 2 = 1/3 -> EV = 2/3
    close(pm.explained_variance(values, returns, mask), 2 / 3)
    close(pm.explained_variance(returns, returns, mask), 1.0)
    flat = torch.tensor([[1.0, 1.0, 1.0, PAD]])
    close(pm.explained_variance(values, flat, mask), 0.0)  # Var(R) = 0: 0, not NaN


def test_rollout_stats_by_hand():
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    kl = torch.tensor([[0.5, -1.0, 2.0], [0.3, 0, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0], [2.0, PAD, PAD]])
    stats = pm.rollout_stats(torch.tensor([1.0, 0.1]), kl, returns, returns, mask)
    close(stats["score_mean"], 0.55)
    close(stats["kl_per_token"], 1.8 / 4)
    close(stats["kl_per_sequence"], (1.5 + 0.3) / 2)
    close(stats["response_length"], 2.0)
    close(stats["value_explained_variance"], 1.0)

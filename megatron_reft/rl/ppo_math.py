"""PPO math for ReFT, as pure functions on tensors (reft.md §4; DESIGN.md "Algorithm math is
pure functions on tensors").

Conventions shared by every function here:

- Per-token tensors are ``[B, T]`` over *action positions* (position t holds the log-prob / value
  of the token the model emits at step t), float32.
- ``action_mask`` is ``[B, T]``, 1 on actions and 0 elsewhere. The trainer's sequences are
  left-aligned and right-padded, but every function also accepts masks with gaps or left
  padding: positions outside the mask are skipped, and whatever they hold (NaN, -inf) never
  leaks into a result or a gradient.
- The last action of a sequence (the one emitting EOS, or the last one if the response was cut
  at the length limit) carries the terminal score.
- Losses average over each sequence's action tokens, then over sequences (§4). Sequences with no
  action are left out of that mean instead of producing NaN.

Nothing here holds state or talks to other processes, except ``whiten_advantages``, whose
definition is a reduction over all data-parallel ranks; its process group is a parameter.
Statistics are returned as detached 0-d tensors so the trainer can reduce them across
micro-batches and ranks without a device sync per value.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is set. Uses ``where`` (not ``x * mask``) so NaN or -inf at
    padding positions cannot turn the sum into NaN."""
    x = torch.where(mask.bool(), x, 0.0)
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over masked positions (all of them, or along ``dim``). An empty mask gives
    0 rather than NaN, so a rank or micro-batch without actions cannot poison the statistics."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp_min(1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all masked positions, two-pass (mean first, then squared
    deviations). ``unbiased`` divides by n - 1, as the reference's whitening does (§4). With too
    few elements the denominator is clamped to 1, giving 0 instead of NaN/inf."""
    mean = masked_mean(x, mask)
    squared_deviations = masked_sum((x - mean) ** 2, mask)
    n = mask.bool().sum().to(x.dtype)
    return squared_deviations / (n - 1 if unbiased else n).clamp_min(1)


def count_sequences(action_mask: Tensor) -> Tensor:
    """Number of sequences with at least one action: the ``num_sequences`` to pass to the losses
    when they run on micro-batches of this (mini-)batch."""
    return action_mask.bool().any(dim=-1).sum()


def sequence_mean(x: Tensor, mask: Tensor, num_sequences: int | Tensor | None = None) -> Tensor:
    """Mean of ``x`` over each sequence's actions, then over sequences (§4: "each averaged over a
    sequence's action tokens, then over sequences"), so long responses do not outweigh short ones.

    Sequences without actions are excluded. If ``num_sequences`` is given (``count_sequences`` of
    the whole mini-batch), the per-sequence means are summed and divided by it instead, so the
    losses of a mini-batch's micro-batches add up exactly to the mini-batch loss.
    """
    counts = mask.bool().sum(dim=-1)
    per_sequence = masked_sum(x, mask, dim=-1) / counts.clamp_min(1).to(x.dtype)
    if num_sequences is None:
        num_sequences = (counts > 0).sum().clamp_min(1)
    return per_sequence.sum() / num_sequences


# ----------------------------------------------------------------------------------------------
# rewards, advantages, whitening (computed once per rollout batch, never differentiated)


def last_action_mask(action_mask: Tensor) -> Tensor:
    """Boolean ``[B, T]``, true at each sequence's last action: where the terminal score goes
    (§4: on the EOS-emitting action, or the last one when cut at the length limit). All false
    for a sequence without actions."""
    mask = action_mask.bool()
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask, positions, -1).amax(dim=-1, keepdim=True)
    return mask & (positions == last)


@torch.no_grad()
def kl_penalized_rewards(
    scores: Tensor,
    logprobs_old: Tensor,
    logprobs_ref: Tensor,
    action_mask: Tensor,
    kl_coef: float,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards with the KL penalty inside the reward (§4):

        r_t = score · [t = last action] − β · (logp_old_t − logp_ref_t)

    The KL is the k1 estimator on the sampled token, with a fixed β (0.05 N-CoT, 0.01 P-CoT).
    Returns ``(rewards, kl)``, both ``[B, T]`` and zero outside the mask; ``kl`` is the
    unscaled per-token k1 term, for logging.
    """
    mask = action_mask.bool()
    kl = torch.where(mask, logprobs_old - logprobs_ref, 0.0)
    terminal = last_action_mask(mask).to(kl.dtype) * scores.to(kl.dtype)[:, None]
    return terminal - kl_coef * kl, kl


@torch.no_grad()
def gae_advantages(
    rewards: Tensor,
    values: Tensor,
    action_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (§4):

        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   returns = A + V

    with γ = 1 inside δ and the sum decayed by λ = 0.95 (the paper's text swaps the names; the
    reference code, which produced the numbers, does this). The value after a sequence's last
    action is 0: the episode ends there, including when it was cut at the length limit.

    "t + 1" is the next *action* of the same sequence, so positions outside the mask are
    skipped rather than read. Returns ``(advantages, returns)``, zero outside the mask.
    """
    mask = action_mask.bool()
    rewards = torch.where(mask, rewards, 0.0)
    values = torch.where(mask, values, 0.0)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(values.shape[1])):  # vectorised over B, sequential over T
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        is_action = mask[:, t]
        advantages.append(torch.where(is_action, advantage, 0.0))
        next_value = torch.where(is_action, values[:, t], next_value)
        next_advantage = torch.where(is_action, advantage, next_advantage)
    advantages = torch.stack(advantages[::-1], dim=1)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def _all_reduce_sum(x: Tensor, group) -> Tensor:
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


@torch.no_grad()
def whiten_advantages(
    advantages: Tensor,
    action_mask: Tensor,
    group=None,
    eps: float = 1e-8,
) -> Tensor:
    """Whiten advantages once per rollout batch: ``(A − mean) / sqrt(var + eps)``, with the masked
    mean and *unbiased* masked variance taken over all action tokens of all data-parallel ranks
    in ``group`` (§4). The mean is not added back, so whitened advantages average to zero.

    Whitening per rank would give each rank its own scale and centre, which changes the update as
    soon as the data-parallel size changes. With ``group=None`` (or no initialised
    torch.distributed) only the local tokens are used. Two passes (sum and count, then the sum of
    squared deviations), accumulated in float64, avoid the cancellation of E[A²] − E[A]².
    Returns a tensor shaped and typed like ``advantages``, zero outside the mask.
    """
    mask = action_mask.bool()
    a = torch.where(mask, advantages, 0.0).double()
    sum_and_count = torch.stack([a.sum(), mask.sum().double()])
    total, count = _all_reduce_sum(sum_and_count, group)
    mean = total / count.clamp_min(1)
    squared_deviations = torch.where(mask, (a - mean) ** 2, 0.0).sum().reshape(1)
    var = _all_reduce_sum(squared_deviations, group)[0] / (count - 1).clamp_min(1)
    whitened = (a - mean) / torch.sqrt(var + eps)
    return torch.where(mask, whitened, 0.0).to(advantages.dtype)


# ----------------------------------------------------------------------------------------------
# losses (differentiated w.r.t. logprobs and values)


def policy_loss(
    logprobs: Tensor,
    logprobs_old: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    clip_eps: float = 0.2,
    num_sequences: int | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO policy loss (§4): per token ``max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))`` with
    ``ratio = exp(logp − logp_old)``, averaged per sequence then over sequences (see
    ``sequence_mean`` for ``num_sequences``).

    Stats (token means over this batch's actions):
      clip_fraction  fraction of actions where the clipped branch is the larger (active) one;
      ratio_mean, ratio_max  (reduce ratio_max across micro-batches/ranks with max, not mean);
      approx_kl      mean of ½·(logp − logp_old)², the "k2" estimator of KL(old ‖ new): always
                     ≥ 0 and second-order accurate for small policy changes.
    """
    mask = action_mask.bool()
    log_ratio = torch.where(mask, logprobs - logprobs_old, 0.0)
    advantages = torch.where(mask, advantages, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = sequence_mean(torch.maximum(unclipped, clipped), mask, num_sequences)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, 0.0).amax(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    values_old: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    clip_range: float = 0.2,
    num_sequences: int | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (§4): ``0.5·max((V − R)², (V_clip − R)²)`` with
    ``V_clip = V_old + clip(V − V_old, −0.2, 0.2)``, averaged per sequence then over sequences.
    Taking the max makes the clip pessimistic: a value may not move far from V_old in one update.

    Stats: value_clip_fraction, the fraction of actions where the clipped term is the larger.
    """
    mask = action_mask.bool()
    values = torch.where(mask, values, 0.0)
    values_old = torch.where(mask, values_old, 0.0)
    returns = torch.where(mask, returns, 0.0)
    values_clipped = values_old + (values - values_old).clamp(-clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = sequence_mean(0.5 * torch.maximum(unclipped, clipped), mask, num_sequences)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


def ppo_loss(
    logprobs: Tensor,
    logprobs_old: Tensor,
    values: Tensor,
    values_old: Tensor,
    advantages: Tensor,
    returns: Tensor,
    action_mask: Tensor,
    clip_eps: float = 0.2,
    value_clip_range: float = 0.2,
    vf_coef: float = 5.0,
    num_sequences: int | Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total shared-trunk loss (§4): ``policy + vf_coef · value`` with vf_coef α = 5.

    ``entropy`` ([B, T], computed vocab-parallel by the engine) is only reported, as a token
    mean; ReFT has no entropy bonus. Stats merge those of both losses with their values.
    """
    pg_loss, pg_stats = policy_loss(
        logprobs, logprobs_old, advantages, action_mask, clip_eps, num_sequences
    )
    vf_loss, vf_stats = value_loss(
        values, values_old, returns, action_mask, value_clip_range, num_sequences
    )
    total = pg_loss + vf_coef * vf_loss
    stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), **pg_stats, **vf_stats}
    if entropy is not None:
        stats["entropy"] = masked_mean(entropy.detach(), action_mask)
    return total, stats


# ----------------------------------------------------------------------------------------------
# statistics users watch


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var(R − V) / Var(R)`` over masked tokens: 1 when the value head predicts returns
    perfectly, 0 when it is no better than a constant, negative when worse. Reported as 0 (not
    NaN) when Var(R) = 0, e.g. a batch whose returns are all equal."""
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    ratio = var_residual / var_returns.clamp_min(torch.finfo(var_returns.dtype).tiny)
    return torch.where(var_returns > 0, 1.0 - ratio, 0.0)


@torch.no_grad()
def rollout_stats(
    scores: Tensor,
    kl: Tensor,
    values: Tensor,
    returns: Tensor,
    action_mask: Tensor,
) -> dict[str, Tensor]:
    """Per-rollout-batch statistics: mean score, KL to the reference (per token and summed per
    sequence — the second is what β scales in a sequence's return), mean response length, and
    the value head's explained variance."""
    mask = action_mask.bool()
    return {
        "score_mean": scores.float().mean(),
        "kl_per_token": masked_mean(kl, mask),
        "kl_per_sequence": masked_sum(kl, mask, dim=-1).mean(),
        "response_length": mask.sum(dim=-1).float().mean(),
        "value_explained_variance": explained_variance(values, returns, mask),
    }

"""Non-finite guard: a NaN/Inf loss or gradient skips the optimizer step instead of writing NaN
into the weights (and from there into `latest`); too many in a row stop the job.

Every check ends in an all-reduce over the whole world (the actor's ranks when a separate
critic holds others), so all ranks take the same decision
(the loss lives on the last pipeline stage, a poisoned gradient on one TP rank only).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_reft.reliability.errors import NonFiniteError

DEFAULT_MAX_NONFINITE_STEPS = 5


def _all_ranks_true(local_ok: bool) -> bool:
    flag = torch.tensor([0.0 if local_ok else 1.0])
    if dist.is_initialized():
        from megatron_reft.distributed.roles import role_group

        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=role_group())  # the role's ranks
    return flag.item() == 0.0


def _tensors_finite(tensors) -> bool:
    """Every entry of every tensor is finite. A tensor's smallest and largest entries are both
    finite exactly when all its entries are (a NaN propagates into both, an infinity shows in
    one): one reduction pass without a boolean copy, ~20x cheaper on a CPU than
    `isfinite(t).all()` over every gradient of every step."""
    extremes = [torch.stack(torch.aminmax(t.detach())) for t in tensors if torch.is_tensor(t) and t.numel()]
    return bool(torch.isfinite(torch.cat(extremes)).all()) if extremes else True


def _stat_values(stats: list[dict]):
    for s in stats:
        for value in s.values():
            if torch.is_tensor(value):
                yield value.float()
            elif isinstance(value, (int, float)):
                yield torch.tensor(float(value))


def step_is_finite(module, stats: list[dict]) -> bool:
    """After backward, before the optimizer step: every rank's loss statistics and gradients
    (megatron keeps them in `main_grad`) are finite."""
    grads = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad
             for p in module.parameters()]
    local = _tensors_finite(_stat_values(stats)) and _tensors_finite(g for g in grads if g is not None)
    return _all_ranks_true(local)


def rollout_is_finite(tensors: dict, mask: torch.Tensor | None = None) -> bool:
    """PPO: rewards, values, advantages, returns, log-probs (masked positions only) are finite on
    every rank; otherwise the update of this rollout batch is skipped."""
    def relevant(t):
        if mask is not None and t.shape == mask.shape:
            return t[mask.bool()]
        return t
    return _all_ranks_true(_tensors_finite(relevant(t.float()) for t in tensors.values()
                                           if torch.is_tensor(t) and t.is_floating_point()))


class NonFiniteGuard:
    """Counts skipped (non-finite) steps; stops the job after `limit` consecutive ones (0: never).

    Why consecutive: an isolated overflow is survivable (the step is skipped, training goes on);
    a run that produces nothing but NaN (lr far too high, weights already diverged) only burns
    GPU hours and must stop while `latest` is still good.
    """

    def __init__(self, limit: int, checkpoints_dir: str | Path):
        self.limit = limit
        self.checkpoints_dir = Path(checkpoints_dir)
        self.consecutive = 0
        self.total = 0

    def observe(self, update_ok: bool) -> dict:
        """Metrics for this step: `skipped_step` (0/1) and `nonfinite_steps` (run total)."""
        if update_ok:
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.total += 1
        return {"skipped_step": 0 if update_ok else 1, "nonfinite_steps": self.total}

    def stop_if_exhausted(self, step: int) -> None:
        if self.limit and self.consecutive >= self.limit:
            from megatron_reft.checkpoint.io import latest_checkpoint

            latest = latest_checkpoint(self.checkpoints_dir)
            raise NonFiniteError(
                f"step {step}: {self.consecutive} consecutive non-finite steps (loss, gradients or "
                f"rollout NaN/Inf; trainer.max_nonfinite_steps={self.limit}); weights not updated "
                f"by them; last good checkpoint: {latest if latest is not None else 'none'}")

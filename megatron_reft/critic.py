"""The critic interface (DESIGN.md "Actor and critic"): `values(microbatches, policy_outputs)`
(or `request_values(microbatches)` ... `.result(policy_outputs)`, which lets a separate critic
compute while the actor runs its own forward), `update(microbatches)` and `update_stats()`.
The trainer talks only to this, so a separate critic (its own model, layout and ranks: `LocalCritic`
below, `critic_server.py`) can replace the shared trunk without touching the trainer.

Shared trunk (reft.md §4, the paper's default): a linear value head on the policy's last hidden
state. Its values come for free with the policy's forward, and its loss rides in the policy's
optimizer step (total = policy loss + vf_coef · value loss), so `update` has nothing to do.
"""
from __future__ import annotations


class SharedTrunkCritic:
    shared = True  # the value loss is part of the policy's loss

    def __init__(self, policy_engine):
        self.policy = policy_engine

    def values(self, microbatches: list[dict], policy_outputs: list[dict]) -> list:
        """V(s_t) at every label position; taken from the policy forward that made them."""
        return [out["values"] for out in policy_outputs]

    def request_values(self, microbatches: list[dict]):
        """Start a value pass; `.result(policy_outputs)` returns the values (here: at once)."""
        return _FromPolicy()

    def update(self, microbatches: list[dict]) -> dict:
        return {}  # trained jointly with the policy (see module docstring)

    def update_stats(self) -> dict:
        return {}  # the value loss is among the policy's statistics

    def close(self) -> None:
        pass  # nothing runs elsewhere


class _FromPolicy:
    def result(self, policy_outputs):
        return [out["values"] for out in policy_outputs]


# ---------------------------------------------------------------------------------------------
# A separate value model (issue 12): its own trunk + head, optimizer and layout.
import time  # noqa: E402

import torch  # noqa: E402


def value_loss_fn(vf_coef: float, value_clip: float):
    """vf_coef · clipped value loss (reft.md §4), per sequence then summed; megatron divides by
    the number of sequences over all micro-batches and DP ranks (engine.py's loss convention).
    Keeping vf_coef makes the separate critic minimise the same value term as the shared trunk."""
    from megatron_reft.rl import ppo_math

    def loss_fn(mb: dict, out: dict):
        mask = mb["action_mask"]
        loss, stats = ppo_math.value_loss(out["values"], mb["values"], mb["returns"], mask,
                                          clip_range=value_clip, num_sequences=1)
        num_sequences = ppo_math.count_sequences(mask)
        stats = {"value_loss": loss.detach() / num_sequences.clamp(min=1), **stats}
        return vf_coef * loss, num_sequences, stats

    return loss_fn


STAT_KEYS = ("value_loss", "value_clip_fraction")


def reduce_critic_stats(stats: list[dict], group=None) -> dict:
    """Mean of the per-micro-batch critic statistics over micro-batches and the critic's DP ranks
    (only last-stage, TP-rank-0 ranks hold statistics; each replica counts once)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    sums = torch.zeros(len(STAT_KEYS) + 1, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for s in stats:
            sums[:-1] += torch.tensor([float(s[k]) for k in STAT_KEYS], dtype=torch.float64)
            sums[-1] += 1
    if dist.is_initialized():
        dist.all_reduce(sums, group=group)
    return {k: float(sums[i] / sums[-1].clamp(min=1)) for i, k in enumerate(STAT_KEYS)}


class LocalCritic:
    """A separate value model living in this process's megatron parallel state.

    Used directly when actor and critic share ranks (the in-process reference of the tests) and,
    on the critic's own ranks, behind `CriticServer`.
    """
    shared = False

    def __init__(self, engine, *, vf_coef: float, value_clip: float, lr: float, group=None):
        self.engine, self.lr, self.group = engine, lr, group
        self.loss_fn = value_loss_fn(vf_coef, value_clip)
        self.seconds = {"critic_values_time": 0.0, "critic_update_time": 0.0}
        self._stats: list[dict] = []

    def request_values(self, microbatches: list[dict]):
        return _Ready(self.values(microbatches))

    def values(self, microbatches: list[dict], policy_outputs=None) -> list:
        t0 = time.perf_counter()
        out = [o["values"] for o in self.engine.forward(microbatches)]
        self.seconds["critic_values_time"] += time.perf_counter() - t0
        return out

    def update(self, microbatches: list[dict]) -> dict:
        """One optimizer step of the critic on one mini-batch."""
        t0 = time.perf_counter()
        self.engine.set_lr(self.lr)
        self.engine.module.train()
        result = self.engine.train_step(microbatches, self.loss_fn)
        self._stats += result["stats"]
        self.seconds["critic_update_time"] += time.perf_counter() - t0
        return {}

    def update_stats(self) -> dict:
        """Statistics of the updates since the last call (value loss, clip fraction, timers)."""
        stats = reduce_critic_stats(self._stats, self.group)
        self._stats = []
        stats.update(self._take_seconds())
        return stats

    def _take_seconds(self) -> dict:
        seconds, self.seconds = self.seconds, {k: 0.0 for k in self.seconds}
        return seconds

    def save(self, directory, model_cfg, tokenizer=None, carry_from=None) -> None:
        """Model, optimizer and RNG into `directory` (the actor's checkpoint's critic/); the
        caller marks the step as latest once both roles are saved."""
        from megatron_reft.checkpoint.io import save_checkpoint

        save_checkpoint(directory, self.engine.module, model_cfg, optimizer=self.engine.optimizer,
                        tokenizer=tokenizer, update_latest=False, carry_from=carry_from)

    def load(self, directory, load_rng: bool = False) -> None:
        """Resume from `directory` at this critic's layout (any TP x PP). load_rng: only on the
        critic's own ranks; on the actor's ranks the actor's checkpoint holds the RNG."""
        from megatron_reft.checkpoint.io import load_checkpoint

        # No _sync_param_copies: the optimizer state brings the exact fp32 main weights back
        load_checkpoint(directory, self.engine.module, optimizer=self.engine.optimizer, load_rng=load_rng)

    def close(self) -> None:
        pass


class _Ready:
    """A finished value request (values already computed)."""

    def __init__(self, values):
        self._values = values

    def result(self, policy_outputs=None):
        return self._values

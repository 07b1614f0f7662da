"""The critic interface (DESIGN.md "Actor and critic"): `values(microbatches, policy_outputs)`
and `update(microbatches)`. The trainer talks only to this, so a separate critic server (its own
model, layout and ranks) can replace the shared trunk without touching the trainer.

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

    def update(self, microbatches: list[dict]) -> dict:
        return {}  # trained jointly with the policy (see module docstring)

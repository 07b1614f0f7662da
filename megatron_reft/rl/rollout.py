"""A rollout batch: prompt + sampled response per row, laid out for the engine.

Layout (one row per sequence, right-padded): `tokens[t]` is fed, `labels[t] = tokens[t + 1]`
is predicted. The action span runs from the last prompt token (it predicts the first response
token) to the token that emits EOS (reft.md §4), so with prompt length P and response length R
(EOS included) the actions sit at label positions P-1 … P+R-2. Every per-token tensor of PPO
(log-probs, values, rewards, advantages) lives at those positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RolloutBatch:
    tokens: torch.Tensor  # [B, S] long
    labels: torch.Tensor  # [B, S] long
    action_mask: torch.Tensor  # [B, S] float, 1 on actions
    prompt_lengths: list[int]
    response_lengths: list[int]
    finished: list[bool]  # EOS emitted (False: cut at the length limit, still terminal)
    tensors: dict = field(default_factory=dict)  # old_logprobs, values, ref_logprobs, advantages, returns

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


def build_rollout_batch(prompts: list[list[int]], responses: list[list[int]], finished: list[bool],
                        pad_id: int) -> RolloutBatch:
    sequences = [p + r for p, r in zip(prompts, responses)]
    width = max(max(len(s) for s in sequences) - 1, 1)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    action_mask = torch.zeros((len(sequences), width))
    for row, (prompt, response, seq) in enumerate(zip(prompts, responses, sequences)):
        ids = torch.tensor(seq, dtype=torch.long)
        n = len(seq) - 1
        tokens[row, :n], labels[row, :n] = ids[:-1], ids[1:]
        action_mask[row, len(prompt) - 1:len(prompt) - 1 + len(response)] = 1.0
    return RolloutBatch(tokens, labels, action_mask, [len(p) for p in prompts],
                        [len(r) for r in responses], list(finished))


def split_rows(batch: RolloutBatch, rows: list[int] | range) -> dict:
    """One micro-batch (a dict the engine and the loss read) from a subset of rows."""
    rows = list(rows)
    mb = {"tokens": batch.tokens[rows], "labels": batch.labels[rows],
          "action_mask": batch.action_mask[rows]}
    mb.update({k: v[rows] for k, v in batch.tensors.items()})
    return mb


def micro_batches(batch: RolloutBatch, rows: list[int], micro_batch_size: int) -> list[dict]:
    """Equal-size micro-batches (the pipeline needs one shape per call); a short tail is padded
    with copies of a row whose action mask is zeroed, so it adds nothing to any loss."""
    groups = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    out = [split_rows(batch, g) for g in groups]
    tail = groups[-1]
    if len(tail) < micro_batch_size:
        filler = split_rows(batch, [tail[0]] * (micro_batch_size - len(tail)))
        filler["action_mask"] = torch.zeros_like(filler["action_mask"])
        out[-1] = {k: torch.cat([out[-1][k], filler[k]]) for k in out[-1]}
    return out


def gather_forward(outputs: list[dict], key: str, num_rows: int) -> torch.Tensor:
    """Concatenate a per-micro-batch output back to [num_rows, S] (dropping filler rows)."""
    return torch.cat([o[key] for o in outputs])[:num_rows]

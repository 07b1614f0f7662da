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
    # The rollout engine's scores of its own tokens (ppo.old_logprobs_from_rollout): "logprobs",
    # "entropy" and, with the policy's value head, "values", [B, S] at the action positions.
    rollout_outputs: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


def build_rollout_batch(prompts: list[list[int]], responses: list[list[int]], finished: list[bool],
                        pad_id: int, token_scores: dict | None = None) -> RolloutBatch:
    """`token_scores`: per-response-token lists from the rollout engine (name → one list per row,
    aligned with `responses`), kept as `rollout_outputs` at the action positions."""
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
    batch = RolloutBatch(tokens, labels, action_mask, [len(p) for p in prompts],
                         [len(r) for r in responses], list(finished))
    batch.rollout_outputs = {name: at_actions(batch, per_token) for name, per_token in (token_scores or {}).items()}
    return batch


def at_actions(batch: RolloutBatch, per_response_token: list[list[float]]) -> torch.Tensor:
    """[B, S]: response token j of a row with prompt length P at label position P-1+j — the
    position whose hidden state chose it, where the engine's forward scores it — 0 elsewhere."""
    out = torch.zeros(batch.tokens.shape)
    for row, (prompt_length, values) in enumerate(zip(batch.prompt_lengths, per_response_token)):
        out[row, prompt_length - 1:prompt_length - 1 + len(values)] = torch.tensor(values, dtype=out.dtype)
    return out


def rollout_outputs(batch: RolloutBatch, microbatches: list[dict], device=None) -> list[dict]:
    """The rollout engine's scores cut like `Engine.forward`'s outputs for these micro-batches
    ([b, w] per key, rows in micro-batch order): a drop-in for the policy's log-prob pass."""
    return [{name: full[mb["rows"], :mb["tokens"].shape[1]].to(device) for name, full in batch.rollout_outputs.items()}
            for mb in microbatches]


def sequence_lengths(batch: RolloutBatch) -> list[int]:
    """Positions each row really uses (prompt + response − 1); the rest of its row is padding."""
    return [max(p + r - 1, 1) for p, r in zip(batch.prompt_lengths, batch.response_lengths)]


def split_rows(batch: RolloutBatch, rows: list[int] | range, width: int | None = None) -> dict:
    """One micro-batch (a dict the engine and the loss read) from a subset of rows, trimmed to
    `width` positions. `rows` and `seq_lengths` (1-D) say where its rows belong and how long
    they are; the engine leaves 1-D entries alone."""
    rows = list(rows)
    width = batch.tokens.shape[1] if width is None else width
    mb = {"tokens": batch.tokens[rows, :width], "labels": batch.labels[rows, :width],
          "action_mask": batch.action_mask[rows, :width]}
    # per-token tensors are trimmed; per-row ones (e.g. online-ST scores, is_gold) are not
    mb.update({k: v[rows, :width] if v.dim() > 1 else v[rows] for k, v in batch.tensors.items()})
    lengths = sequence_lengths(batch)
    mb["rows"] = torch.tensor(rows)
    mb["seq_lengths"] = torch.tensor([min(lengths[r], width) for r in rows])
    return mb


PIPELINE_WIDTH_MULTIPLE = 16  # with PP, widths rounded up to this: few shapes, few schedule calls


def pipeline_width_multiple() -> int:
    """1 without pipelining (any shape is free); PIPELINE_WIDTH_MULTIPLE with it."""
    try:
        from megatron.core import parallel_state as ps

        pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    except ImportError:
        pp = 1
    return PIPELINE_WIDTH_MULTIPLE if pp > 1 else 1


def micro_batches(batch: RolloutBatch, rows: list[int], micro_batch_size: int,
                  token_budget: int | None = None, width_multiple: int | None = None) -> list[dict]:
    """Length-sorted micro-batches, each trimmed to its own longest row (data/batching.py's plan):
    `micro_batch_size` rows each, or as many as fit in `token_budget` positions. The engine runs
    micro-batches of different shapes (one pipeline schedule call per shape when PP > 1);
    `width_multiple` (default: `pipeline_width_multiple()`) rounds widths up so that fewer
    distinct shapes arise. Losses are per-sequence or per-token sums (engine.py's convention), so
    this changes no loss or gradient."""
    from megatron_reft.data.batching import group_width, plan_micro_batches

    if width_multiple is None:
        width_multiple = pipeline_width_multiple()
    rows = list(rows)
    lengths = sequence_lengths(batch)
    mine = [lengths[r] for r in rows]
    cap = batch.tokens.shape[1]
    groups = plan_micro_batches(mine, micro_batch_size, token_budget, width_multiple, cap)
    return [split_rows(batch, [rows[i] for i in g], group_width(mine, g, width_multiple, cap))
            for g in groups]


def padding_stats(batch: RolloutBatch, microbatches: list[dict]) -> dict:
    """Padding share of the positions computed: as planned, and if every row had the batch width."""
    real = sum(int(mb["seq_lengths"].sum()) for mb in microbatches)
    computed = sum(mb["tokens"].numel() for mb in microbatches)
    rows = sum(mb["tokens"].shape[0] for mb in microbatches)
    return {"padding_fraction": 1.0 - real / max(computed, 1),
            "padding_fraction_untrimmed": 1.0 - real / max(rows * batch.tokens.shape[1], 1)}


def assemble(per_microbatch: list[torch.Tensor], microbatches: list[dict], num_rows: int,
             width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[num_rows, width] on `device` (default: the outputs') from per-micro-batch [b, w]
    tensors, each row back at its place (positions past a micro-batch's width are 0)."""
    first = per_microbatch[0]
    out = torch.zeros((num_rows, width), dtype=first.dtype, device=device or first.device)
    for values, mb in zip(per_microbatch, microbatches):
        w = min(values.shape[1], width)
        out[mb["rows"].to(out.device), :w] = values[:, :w].to(out.device)
    return out


def gather_forward(outputs: list[dict], key: str, microbatches: list[dict], batch: RolloutBatch) -> torch.Tensor:
    """One engine output (`key`) back as [B, S] in the batch's row order, where the batch lives
    (the host): the advantage math runs beside the rollout batch, and the engine copies each
    micro-batch's share to the model's device when it runs it."""
    return assemble([o[key] for o in outputs], microbatches, batch.size, batch.tokens.shape[1],
                    device=batch.tokens.device)

"""Self-training baselines of reft.md §6, as pure functions (the conventions of ppo_math.py).

Online self-training: ReFT's loop (sample one CoT per question from the current policy, score
it), but the update is supervised: 0.5·CE(the samples that were correct, reward = 1) +
0.5·CE(the gold CoTs of the same questions); no KL, no value head, no advantages.

As in the reference (train_rl_sl.py), each CE is a mean over target tokens of the mini-batch
(a token-level mean, like HF's `labels=` loss), and a mini-batch without a correct sample
contributes only the gold half (still weighted 0.5, not renormalised).
"""
from __future__ import annotations

import torch

from megatron_reft.rl.ppo_math import masked_sum

Tensor = torch.Tensor


def correct_sample_mask(scores: Tensor, action_mask: Tensor, correct_score: float = 1.0) -> Tensor:
    """Action mask restricted to the samples whose score is the full reward (a partial reward
    of 0.1 for a wrong but extracted answer does not count as correct)."""
    correct = (scores >= correct_score).to(action_mask.dtype)
    return action_mask * correct[:, None]


def online_self_training_loss(sample_logprobs: Tensor, sample_mask: Tensor, gold_logprobs: Tensor,
                              gold_mask: Tensor, sample_weight: float = 0.5, gold_weight: float = 0.5,
                              num_sample_tokens: int | Tensor | None = None,
                              num_gold_tokens: int | Tensor | None = None) -> tuple[Tensor, dict]:
    """`sample_weight`·CE(correct samples) + `gold_weight`·CE(gold CoTs).

    - sample_logprobs [B, T]: log-probs of the sampled response tokens; `sample_mask` is the
      action mask of the CORRECT samples only (see `correct_sample_mask`).
    - gold_logprobs [G, S]: log-probs of the gold targets (SFT's loss mask: CoT tokens + EOS).
    - num_*_tokens: the mini-batch's token counts when this runs on a micro-batch of it, so the
      micro-batch losses add up to the mini-batch loss (as `sequence_mean`'s num_sequences).
    """
    n_sample = sample_mask.bool().sum() if num_sample_tokens is None else torch.as_tensor(num_sample_tokens)
    n_gold = gold_mask.bool().sum() if num_gold_tokens is None else torch.as_tensor(num_gold_tokens)
    sample_ce = -masked_sum(sample_logprobs, sample_mask) / n_sample.clamp_min(1).to(sample_logprobs.dtype)
    gold_ce = -masked_sum(gold_logprobs, gold_mask) / n_gold.clamp_min(1).to(gold_logprobs.dtype)
    loss = sample_weight * sample_ce + gold_weight * gold_ce
    stats = {"sample_ce": sample_ce.detach(), "gold_ce": gold_ce.detach(),
             "correct_samples": sample_mask.bool().any(dim=-1).sum().detach()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# offline self-training data (reft.md §6): sample k CoTs per train question from the warm-up
# model at T = 1, keep up to 10 unique correct ones plus the gold CoT, SFT from the base model.


def sampled_cot(response: str, cot_type: str) -> str:
    """A sampled response as a Record.cot: N-CoT without its final "Therefore, the answer is: X"
    (the SFT target appends the gold answer again); P-CoT the program as executed (up to the
    first blank line, reward/extract.py)."""
    from megatron_reft.data.prompts import ANSWER_TRIGGER
    from megatron_reft.reward.extract import extract_program

    if cot_type == "pcot":
        return extract_program(response)
    head, trigger, _ = response.rpartition(ANSWER_TRIGGER)
    return (head if trigger else response).strip()


def offline_self_training_records(record, samples: list[dict], cot_type: str, max_samples: int = 10) -> list:
    """The gold record, then up to `max_samples` correct samples with distinct CoTs (first seen
    first). A sample's CoT equal to the gold one (or to an earlier sample's) is a duplicate;
    incorrect samples (partial reward included) are dropped. `samples` are the sample store's
    dicts ({"response", "correct", ...}); new records get ids "<id>-s<j>" (j: sample index),
    keeping the dataset prefix that selects the answer rules."""
    from dataclasses import replace

    kept, seen = [record], {record.cot.strip()}
    for j, sample in enumerate(samples):
        if len(kept) > max_samples:
            break
        if not sample["correct"]:
            continue
        cot = sampled_cot(sample["response"], cot_type)
        if not cot or cot in seen:
            continue
        seen.add(cot)
        kept.append(replace(record, id=f"{record.id}-s{j}", cot=cot, meta={**record.meta, "source": "sample"}))
    return kept

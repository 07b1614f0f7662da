"""Reward-model reranking (reft.md §6): a correct/incorrect classifier on the megatron-core trunk,
initialised from the SFT or ReFT checkpoint, trained on warm-up samples of the train set
(lr 1e-6, 3 epochs, length 700); at test time the valid sample with the highest P(correct) wins.

The classification head is the engine's linear head on the last hidden state (`with_value_head`,
hidden → 1), read at the sequence's FINAL token (EOS): its output z is the logit of "correct",
P(correct) = sigmoid(z). A 2-class softmax head with rows w0, w1 is the same model with
z = (w1 − w0)·h, so this is the paper's 2-class classifier with one redundant parameter row
removed; the loss is the 2-class cross-entropy, i.e. binary CE on z.

Sequences: prompt `Question:\\n…\\nAnswer reasoning:\\n` + the stored response (for P-CoT the
whole program) + EOS, tokenised separately as SFT does. A pad token is appended so that the last
fed token is the EOS: the head then reads the EOS's hidden state (rl/rollout.py's layout feeds
tokens[:-1]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_reft.rl.ppo_math import last_action_mask


def classifier_batch(prompts: list[list[int]], responses: list[list[int]], labels: list[float], pad_id: int):
    """A RolloutBatch whose `last` tensor marks, per row, the position reading the final token."""
    from megatron_reft.rl.rollout import build_rollout_batch

    batch = build_rollout_batch(prompts, [r + [pad_id] for r in responses], [True] * len(prompts), pad_id)
    batch.tensors.update(last=last_action_mask(batch.action_mask).float(),
                         is_correct=torch.tensor(labels, dtype=torch.float32))
    return batch


def correct_logits(values: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[B] logit of "correct": the head's output at each row's final token (0 for a filler row)."""
    return torch.where(last.bool(), values, 0.0).sum(-1)


def classifier_loss(values: torch.Tensor, last: torch.Tensor, is_correct: torch.Tensor) -> tuple:
    """Summed 2-class cross-entropy over the rows that have a final token, their count, and stats
    (engine.py's loss convention: megatron divides by the summed count over micro-batches and DP)."""
    rows = last.bool().any(-1)
    logits = correct_logits(values, last)
    ce = F.binary_cross_entropy_with_logits(logits, is_correct, reduction="none")
    loss = torch.where(rows, ce, 0.0).sum()
    hits = ((logits > 0).float() == is_correct) & rows
    return loss, rows.sum(), {"rm_loss_sum": loss.detach(), "rm_hits": hits.sum().detach(),
                              "rm_rows": rows.sum().detach()}


def rm_loss_fn(mb: dict, out: dict):
    return classifier_loss(out["values"], mb["last"] * mb["action_mask"], mb["is_correct"])


@torch.no_grad()
def p_correct(engine, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
              micro_batch_size: int = 8) -> list[float]:
    """P(correct) for each (prompt, response) with a value-head engine (every rank the same)."""
    from megatron_reft.rl.rollout import gather_forward, micro_batches

    if not prompts:
        return []
    batch = classifier_batch(prompts, responses, [0.0] * len(prompts), pad_id)
    rows = list(range(batch.size))
    mbs = micro_batches(batch, rows, min(micro_batch_size, batch.size))
    values = gather_forward(engine.forward(mbs), "values", mbs, batch)  # back in row order
    return torch.sigmoid(correct_logits(values, batch.tensors["last"])).tolist()


def encode_pair(tokenizer, question: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS), tokenised separately as for SFT (reft.md §2)."""
    from megatron_reft.data.prompts import build_prompt

    return tokenizer.encode(build_prompt(question)), tokenizer.encode(response) + [tokenizer.eos_id]


def load_reranker(config, model_cfg, ckpt: str):
    """A value-head engine with the reward model's weights; refuses a checkpoint without a head
    (an SFT checkpoint is the reward model's initialisation, not a reward model)."""
    from megatron_reft import runtime
    from megatron_reft.checkpoint.io import checkpoint_tensor_keys, load_checkpoint
    from megatron_reft.engines import build_engine

    if not any("value_head" in key for key in checkpoint_tensor_keys(ckpt)):
        raise runtime.ConfigError(f"--reranker: {ckpt} has no classification head (train one with "
                                  "`megatron-reft train-rm`)")
    engine = build_engine(config, model_cfg, optim=False, value_head=True)
    load_checkpoint(ckpt, engine.module)
    return engine


def score_stored_samples(engine, tokenizer, records: list, stored: dict, max_length: int,
                         micro_batch_size: int) -> dict[str, list[float]]:
    """id -> P(correct) per stored sample, this DP rank's strided share of `records` gathered on
    every rank. A sample longer than `max_length` tokens gets 0.0 (picked only if nothing else is)."""
    from megatron_reft import runtime
    from megatron_reft.data import eval_shard
    from megatron_reft.evaluation.run import _all_gather

    dp_rank, dp_size = runtime.dp_rank_and_size()
    scores = []
    for i in eval_shard(len(records), dp_rank, dp_size):
        item = stored.get(str(records[i].id))
        if item is None:
            continue
        pairs = [encode_pair(tokenizer, records[i].question, s["response"]) for s in item["samples"]]
        fits = [j for j, (p, r) in enumerate(pairs) if len(p) + len(r) <= max_length]
        probs = p_correct(engine, [pairs[j][0] for j in fits], [pairs[j][1] for j in fits], tokenizer.pad_id,
                          micro_batch_size)
        row = [0.0] * len(pairs)
        for j, q in zip(fits, probs):
            row[j] = q
        scores.append((str(records[i].id), row))
    return dict(_all_gather(scores))

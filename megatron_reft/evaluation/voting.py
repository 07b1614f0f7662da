"""Inference-time extras over k sampled answers per question (reft.md §6): majority voting@k,
pass@k (unbiased estimator) and reward-model reranking@k. Pure functions, no torch.

A sample is described by its extracted answer (`None` when nothing could be extracted: the
answer is *invalid*), whether it is correct, and, for reranking, the reward model's P(correct).
"Valid" means the scorer extracted an answer (ScoreResult.extracted is not None); the scorer
writes numbers in one canonical form ("72", "0.75"), so voting compares those strings exactly.

Conventions (docs/evaluation.md):
- Only the FIRST k samples of a question take part; k larger than the number of samples n
  uses all n (voting@k and reranking@k on n samples, pass@k read as pass@n).
- Majority voting: the most frequent valid answer wins; a tie goes to the tied answer that
  appears FIRST in sample order (deterministic, and with i.i.d. samples as fair as a coin).
  Invalid answers never win: a question whose k samples are all invalid counts as wrong.
- Reranking: the valid sample with the highest P(correct) is picked; a tie goes to the
  earliest sample; invalid samples are never picked (all invalid → wrong).
- pass@k: 1 − C(n−c, k)/C(n, k) with n samples of which c are correct (Chen et al. 2021),
  the probability that k samples drawn without replacement from the n contain a correct one.
"""
from __future__ import annotations

from collections import Counter
from math import comb
from typing import Sequence


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def majority_answer(answers: Sequence[str | None], k: int) -> str | None:
    """The most frequent valid answer among the first k (ties: first seen wins); None if no
    valid answer."""
    _check_k(k)
    counts = Counter(a for a in answers[:k] if a is not None)  # insertion order = first seen
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a, c in counts.items() if c == best)


def majority_vote_correct(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> bool:
    """Whether majority voting@k answers this question correctly."""
    _check_lengths(answers, correct)
    winner = majority_answer(answers, k)
    if winner is None:
        return False
    return bool(correct[list(answers).index(winner)])  # equal answers are judged alike


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct; k > n is read as k = n."""
    _check_k(k)
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if n == 0:
        return 0.0
    k = min(k, n)
    return 1.0 - comb(n - c, k) / comb(n, k)


def rerank_pick(answers: Sequence[str | None], p_correct: Sequence[float], k: int) -> int | None:
    """Index of the valid sample with the highest P(correct) among the first k (ties: the
    earliest); None if none of them is valid."""
    _check_k(k)
    _check_lengths(answers, p_correct)
    best = None
    for i in range(min(k, len(answers))):
        if answers[i] is not None and (best is None or p_correct[i] > p_correct[best]):
            best = i
    return best


def rerank_correct(answers: Sequence[str | None], correct: Sequence[bool],
                   p_correct: Sequence[float], k: int) -> bool:
    _check_lengths(answers, correct)
    pick = rerank_pick(answers, p_correct, k)
    return pick is not None and bool(correct[pick])


def sample_metrics(items: Sequence[Sequence[dict]], k: int) -> dict:
    """Mean maj_at_k and pass_at_k (and rerank_at_k when every sample has "p_correct") over
    questions; each question is a list of sample dicts with "extracted" and "correct".
    pass@k uses all n samples of a question, voting and reranking the first k."""
    _check_k(k)
    if not items:
        return {"maj_at_k": 0.0, "pass_at_k": 0.0}
    maj = passed = rerank = 0.0
    with_rm = all("p_correct" in s for samples in items for s in samples)
    for samples in items:
        answers = [s["extracted"] for s in samples]
        correct = [bool(s["correct"]) for s in samples]
        maj += majority_vote_correct(answers, correct, k)
        passed += pass_at_k(len(samples), sum(correct), k)
        if with_rm:
            rerank += rerank_correct(answers, correct, [s["p_correct"] for s in samples], k)
    n = len(items)
    metrics = {"maj_at_k": maj / n, "pass_at_k": passed / n}
    if with_rm:
        metrics["rerank_at_k"] = rerank / n
    return metrics


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} answers but {len(b)} values")

"""Majority voting@k, pass@k and reranking@k (reft.md §6) on fixed, hand-checked samples."""
from __future__ import annotations

from math import comb

import pytest

from megatron_reft.evaluation.voting import (majority_answer, majority_vote_correct, pass_at_k,
                                             rerank_correct, rerank_pick, sample_metrics)

GOLD = "72"


def correct_of(answers):
    return [a == GOLD for a in answers]


# ---------------------------------------------------------------- majority voting
def test_most_frequent_valid_answer_wins():
    answers = ["5", "72", "72", None, "5", "72"]
    assert majority_answer(answers, 6) == "72"
    assert majority_vote_correct(answers, correct_of(answers), 6)


def test_invalid_answers_never_win():
    answers = [None, None, None, "5"]  # three invalid samples, one valid wrong answer
    assert majority_answer(answers, 4) == "5"
    assert not majority_vote_correct(answers, correct_of(answers), 4)
    assert majority_answer([None, None], 2) is None
    assert not majority_vote_correct([None, None], [False, False], 2)


def test_tie_goes_to_the_answer_seen_first():
    answers = ["5", "72", "72", "5"]  # 2 : 2
    assert majority_answer(answers, 4) == "5"
    assert not majority_vote_correct(answers, correct_of(answers), 4)
    flipped = ["72", "5", "5", "72"]
    assert majority_vote_correct(flipped, correct_of(flipped), 4)
    # an invalid sample before both does not change who was seen first among valid answers
    assert majority_answer([None, "72", "5"], 3) == "72"


def test_only_the_first_k_samples_vote():
    answers = ["5", "72", "72", "5", "5"]
    assert majority_answer(answers, 1) == "5"
    assert majority_answer(answers, 3) == "72"  # 72 ×2 vs 5 ×1
    assert majority_answer(answers, 5) == "5"   # 5 ×3 vs 72 ×2


def test_k_larger_than_the_samples_uses_them_all():
    answers = ["72", "5", "72"]
    assert majority_answer(answers, 100) == "72"
    assert majority_vote_correct(answers, correct_of(answers), 100)


def test_bad_k_is_rejected():
    for k in (0, -1, 2.0):
        with pytest.raises(ValueError):
            majority_answer(["1"], k)


# ---------------------------------------------------------------- pass@k
def test_pass_at_k_hand_computed():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # pass@1 is the fraction correct
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_pass_at_k_edges():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    # n - c < k: every k-subset holds a correct sample
    assert pass_at_k(5, 3, 3) == 1.0
    # k > n reads as pass@n: "any correct" - and 0 when none is (the naive
    # "n - c < k → 1" shortcut would wrongly give 1.0 here)
    assert pass_at_k(3, 0, 10) == 0.0
    assert pass_at_k(3, 1, 10) == 1.0
    assert pass_at_k(0, 0, 1) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_pass_at_k_is_the_subset_probability():
    # brute force over all k-subsets of a fixed sample list
    from itertools import combinations

    correct = [False, True, False, False, True, False]
    for k in range(1, 7):
        subsets = list(combinations(correct, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(6, 2, k) == pytest.approx(expected)
        assert len(subsets) == comb(6, k)


# ---------------------------------------------------------------- reranking
def test_rerank_picks_the_valid_sample_with_highest_p():
    answers = ["5", None, "72", "9"]
    p = [0.3, 0.99, 0.8, 0.8]  # the invalid sample has the highest score but is never picked
    assert rerank_pick(answers, p, 4) == 2  # 0.8 tie between samples 2 and 3: the earlier
    assert rerank_correct(answers, correct_of(answers), p, 4)
    assert rerank_pick(answers, p, 2) == 0  # first two samples only
    assert not rerank_correct(answers, correct_of(answers), p, 2)


def test_rerank_all_invalid_and_large_k():
    assert rerank_pick([None, None], [0.9, 0.1], 5) is None
    assert not rerank_correct([None, None], [False, False], [0.9, 0.1], 5)
    assert rerank_pick(["1", "72"], [0.1, 0.2], 100) == 1


# ---------------------------------------------------------------- per-question aggregation
def _samples(answers, p=None):
    return [{"extracted": a, "correct": a == GOLD, **({"p_correct": p[i]} if p else {})}
            for i, a in enumerate(answers)]


def test_sample_metrics_means_over_questions():
    items = [_samples(["72", "5", "72", None]),   # maj ✓, pass@2 = 1 - C(2,2)/C(4,2) = 5/6
             _samples(["5", "5", "72", None]),    # maj ✗, pass@2 = 1 - C(3,2)/C(4,2) = 1/2
             _samples([None, None, None, None])]  # maj ✗, pass@2 = 0
    m = sample_metrics(items, 4)
    assert m["maj_at_k"] == pytest.approx(1 / 3)
    assert "rerank_at_k" not in m
    m2 = sample_metrics(items, 2)
    assert m2["pass_at_k"] == pytest.approx((5 / 6 + 1 / 2 + 0) / 3)
    assert m2["maj_at_k"] == pytest.approx(1 / 3)  # q1: 72 vs 5 tie → 72 first; q2: 5


def test_sample_metrics_with_reranker_scores():
    items = [_samples(["5", "72"], [0.4, 0.6]), _samples(["72", "5"], [0.1, 0.9])]
    m = sample_metrics(items, 2)
    assert m["rerank_at_k"] == pytest.approx(0.5)
    assert m["pass_at_k"] == 1.0
    assert m["maj_at_k"] == pytest.approx(0.5)  # 1:1 ties → the first answer

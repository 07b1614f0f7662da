"""Reference-exact options the paper's recipes use (issue 9, reft.md §3, §5): MathQA-MCQ
partial reward, Galactica's missing EOS, prompt truncation."""
import json
import logging
import random
from pathlib import Path

import pytest

from megatron_reft.reward import RewardConfig, RewardScorer, parse_mathqa_options
from megatron_reft.reward.extract import ANSWER_TRIGGER

MWP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwp_reft"
needs_data = pytest.mark.skipif(not MWP.is_dir(), reason=f"{MWP} not found (shared data absent)")


@pytest.fixture(scope="module")
def mathqa():
    items = json.loads((MWP / "mathqa_test_set.json").read_text())
    assert len(items) == 1605
    return items


def wrong_letter(gold: str) -> str:
    return "b" if gold == "a" else "a"


def ncot_responses(item) -> dict[str, str]:
    gold = item["answer_value"]
    return {"right": f"Some reasoning.\n{ANSWER_TRIGGER} {gold}",
            "wrong": f"Some reasoning.\n{ANSWER_TRIGGER} {wrong_letter(gold)}",
            "not a letter": f"{ANSWER_TRIGGER} forty-two",
            "no trigger": "I cannot tell.",
            "empty": ""}


@needs_data
def test_mcq_ncot_reference_rewards_are_always_0_1_or_1(mathqa):
    kinds = ["right", "wrong", "not a letter", "no trigger", "empty"]
    responses = [ncot_responses(i)[k] for i in mathqa for k in kinds]
    golds = [i["answer_value"] for i in mathqa for _ in kinds]
    expected_kinds = kinds * len(mathqa)
    reference = RewardScorer(RewardConfig(cot_type="ncot", mcq_partial_reward=True))
    rewards = [r.reward for r in reference.score(responses, golds, ["choice"] * len(golds))]
    assert rewards == [1.0 if k == "right" else 0.1 for k in expected_kinds]
    # The default (the paper's rule): no partial reward on multiple choice at all.
    default = RewardScorer(RewardConfig(cot_type="ncot"))
    rewards = [r.reward for r in default.score(responses, golds, ["choice"] * len(golds))]
    assert rewards == [1.0 if k == "right" else 0.0 for k in expected_kinds]


@needs_data
def test_mcq_pcot_reference_rewards_on_real_items(mathqa):
    items = random.Random(0).sample(mathqa, 60)
    programs, golds, questions, expected = [], [], [], []
    for item in items:
        gold = item["answer_value"]
        options = parse_mathqa_options(item["question"])
        cases = [(f"def solution():\n    return {gold!r}", 1.0),                  # the letter
                 (f"def solution():\n    return {options[gold]!r}", 1.0),         # the option's text
                 (f"def solution():\n    return {wrong_letter(gold)!r}", 0.1),    # a wrong letter
                 ("def solution():\n    return 1 / 0", 0.1),                      # crashes
                 ("def solution():\n    return None", 0.1),                       # no answer
                 ("def solution(:\n    return 'a'", 0.1)]                         # does not parse
        for program, reward in cases:
            programs.append(program), golds.append(gold), questions.append(item["question"])
            expected.append(reward)
    with RewardScorer(RewardConfig(cot_type="pcot", num_workers=2, mcq_partial_reward=True)) as scorer:
        results = scorer.score(programs, golds, ["choice"] * len(golds), questions)
        assert [r.reward for r in results] == expected
        statuses = {r.status for r in results}
        assert {"ok", "none", "error:ZeroDivisionError", "error:SyntaxError"} <= statuses
        # Numeric items keep the paper's rule even in this mode: a crash earns nothing.
        crash = scorer.score(["def solution():\n    return 1 / 0"], ["3"], ["number"])
        assert crash[0].reward == 0.0

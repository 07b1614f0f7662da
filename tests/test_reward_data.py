"""The reward on the ReFT authors' real data (../shared/data/mwp_reft): every gold CoT scores
1.0, perturbed answers score the partial reward, text without an answer scores 0."""
import json
import re
from pathlib import Path

import pytest

from megatron_reft.reward import (RewardConfig, RewardScorer, answer_type_for,
                                  parse_mathqa_options)
from megatron_reft.reward.extract import ANSWER_TRIGGER

MWP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwp_reft"
needs_data = pytest.mark.skipif(not MWP.is_dir(), reason=f"{MWP} not found (shared data absent)")


def load(name):
    return json.loads((MWP / name).read_text())


@pytest.fixture(scope="module")
def pcot_scorer():
    with RewardScorer(RewardConfig(cot_type="pcot", num_workers=2)) as scorer:
        yield scorer


@needs_data
def test_all_svamp_ncot_gold_targets_score_one():
    items = load("svamp_nl.json")
    assert len(items) == 3076
    targets = [f"{i['answer_cot'].strip()}\n{ANSWER_TRIGGER} {i['answer_value']}" for i in items]
    golds = [i["answer_value"] for i in items]
    kinds = [answer_type_for(i["item_id"]) for i in items]
    scorer = RewardScorer(RewardConfig(cot_type="ncot"))
    assert [r.reward for r in scorer.score(targets, golds, kinds)] == [1.0] * 3076

    perturbed = [f"{i['answer_cot'].strip()}\n{ANSWER_TRIGGER} {float(i['answer_value']) + 1}"
                 for i in items]
    assert {r.reward for r in scorer.score(perturbed, golds, kinds)} == {0.1}
    no_answer = [i["answer_cot"] for i in items]  # the CoT alone has no answer trigger
    results = scorer.score(no_answer, golds, kinds)
    assert {r.reward for r in results} == {0.0} and {r.status for r in results} == {"none"}


@needs_data
def test_all_svamp_pcot_gold_programs_score_one(pcot_scorer):
    items = load("svamp_python_sdp.json")
    assert len(items) == 3043
    results = pcot_scorer.score([i["answer_cot"] for i in items],
                                [i["answer_value"] for i in items],
                                [answer_type_for(i["item_id"]) for i in items])
    wrong = [(i["item_id"], r) for i, r in zip(items, results) if r.reward != 1.0]
    assert wrong == []
    assert {r.status for r in results} == {"ok"}


@needs_data
def test_perturbed_and_answerless_programs(pcot_scorer):
    items = load("svamp_python_sdp.json")[:200]
    golds = [i["answer_value"] for i in items]
    kinds = ["number"] * len(items)
    off_by_one = [re.sub(r"return result\s*$", "return result + 1", i["answer_cot"])
                  for i in items]
    assert {r.reward for r in pcot_scorer.score(off_by_one, golds, kinds)} == {0.1}
    returns_none = [re.sub(r"return result\s*$", "return None", i["answer_cot"]) for i in items]
    results = pcot_scorer.score(returns_none, golds, kinds)
    assert {r.reward for r in results} == {0.0} and {r.status for r in results} == {"none"}
    prose = ["I am not sure how to solve this."] * 3  # no program at all
    results = pcot_scorer.score(prose, golds[:3], kinds[:3])
    assert [r.reward for r in results] == [0.0] * 3
    assert {r.status for r in results} == {"error:SyntaxError"}


@needs_data
def test_mathqa_test_items_parse_their_inline_options():
    items = load("mathqa_test_set.json")
    assert len(items) == 1605
    for item in items:
        options = parse_mathqa_options(item["question"])
        assert sorted(options) == list("abcde"), item["item_id"]
        assert all(text for text in options.values()), item["item_id"]
        assert item["answer_value"] in options
        assert answer_type_for(item["item_id"]) == "choice"
    numeric = load("mathqa-numeric_test_set.json")
    assert {answer_type_for(i["item_id"]) for i in numeric} == {"number"}


@needs_data
def test_mathqa_choice_rewards(pcot_scorer):
    items = load("mathqa_test_set.json")[:5]
    golds = [i["answer_value"] for i in items]
    other = [{"a": "b"}.get(g, "a") for g in golds]
    ncot = RewardScorer(RewardConfig(cot_type="ncot"))
    right = ncot.score([f"... {ANSWER_TRIGGER} {g}" for g in golds], golds, ["choice"] * 5)
    wrong = ncot.score([f"... {ANSWER_TRIGGER} {o}" for o in other], golds, ["choice"] * 5)
    assert [r.reward for r in right] == [1.0] * 5 and [r.reward for r in wrong] == [0.0] * 5
    reference = RewardScorer(RewardConfig(cot_type="ncot", mcq_partial_reward=True))
    assert [r.reward for r in reference.score([f"{ANSWER_TRIGGER} {o}" for o in other], golds,
                                              ["choice"] * 5)] == [0.1] * 5
    # a P-CoT program may return the letter, or the value of the right option
    options = [parse_mathqa_options(i["question"]) for i in items]
    programs = [f"def solution():\n    return {o[g]!r}" for o, g in zip(options, golds)]
    programs[0] = f"def solution():\n    return {golds[0]!r}"
    results = pcot_scorer.score(programs, golds, ["choice"] * 5, [i["question"] for i in items])
    assert [r.extracted for r in results] == golds
    assert [r.reward for r in results] == [1.0] * 5


@needs_data
def test_fork_path_gives_the_same_rewards_as_the_fast_lane(pcot_scorer):
    """The gold programs are all statically pure, so the test above runs them in the fast
    lane; the fork-per-program path must agree on them."""
    items = load("svamp_python_sdp.json")[::10]
    args = ([i["answer_cot"] for i in items], [i["answer_value"] for i in items],
            ["number"] * len(items))
    config = RewardConfig(cot_type="pcot", num_workers=2, fast_path=False)
    with RewardScorer(config) as fork_only:
        assert fork_only.score(*args) == pcot_scorer.score(*args)
        assert "others fork" not in fork_only.isolation_summary
    assert "others fork" in pcot_scorer.isolation_summary

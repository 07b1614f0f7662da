"""Answer extraction and the reward rules (reft.md §3), on hand-written cases."""
import math

import pytest

from megatron_reft.reward import (RewardConfig, RewardScorer, answer_type_for, extract_program,
                                  parse_choice, parse_mathqa_options, parse_number)
from megatron_reft.reward.extract import extract_ncot_answer
from megatron_reft.reward.score import judge

T = "Therefore, the answer is:"


@pytest.mark.parametrize("text, robust, strict", [
    ("72", 72.0, 72.0),
    (" 72 ", 72.0, 72.0),
    ("1,000", 1000.0, None),
    ("1,234,567.5", 1234567.5, None),
    ("$5", 5.0, None),
    ("-$5.50", -5.5, None),
    ("50%", 50.0, None),
    ("5.", 5.0, 5.0),
    ("18.", 18.0, 18.0),
    ("-3", -3.0, -3.0),
    ("0.125", 0.125, 0.125),
    (".5", 0.5, 0.5),
    ("3/4", 0.75, None),
    ("-3 / 4", -0.75, None),
    ("\u22127", -7.0, None),          # unicode minus
    ("<203>.", 203.0, None),
    ("72\n\nQuestion: next one", 72.0, None),  # the model kept writing
    ("1,5", None, None),              # not a thousands grouping
    ("18 dollars", None, None),
    ("nan", None, math.nan),          # float() accepts it; the robust parser does not
    ("3 / 0", None, None),
    ("", None, None),
])
def test_parse_number(text, robust, strict):
    assert parse_number(text) == robust
    got = parse_number(text, strict=True)
    if strict is not None and math.isnan(strict):
        assert math.isnan(got)
    else:
        assert got == strict


def test_ncot_answer_is_after_the_last_trigger():
    text = f"Step 1. {T} 5\nWait, recompute. {T} 7"
    assert extract_ncot_answer(text) == " 7"
    assert extract_ncot_answer("no trigger here: 7") is None


def test_program_stops_at_first_blank_line():
    response = ("def solution():\n    \"\"\"q\"\"\"\n    a = 2\n    return a * 3\n\n"
                "Question: another one\ndef solution():\n    return 0\n")
    assert extract_program(response) == 'def solution():\n    """q"""\n    a = 2\n    return a * 3'
    assert extract_program("  \ndef solution():\n    return 1\n   \nprint(2)") == \
        "def solution():\n    return 1"


@pytest.mark.parametrize("text, letter", [
    ("c", "c"), (" C ", "c"), ("(c)", "c"), ("c ) 38", "c"), ("'d'", "d"), ("e.", "e"),
    ("b\nmore text", "b"), ("a total of 38", None), ("f", None), ("", None), ("38", None),
])
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


def test_choice_by_option_value():
    options = parse_mathqa_options("q ?\na ) 38 , b ) 27.675 , c ) $ 1,354 , d ) data inadequate , "
                                   "e ) none of these")
    assert options == {"a": "38", "b": "27.675", "c": "$ 1,354", "d": "data inadequate",
                       "e": "none of these"}
    assert parse_choice("27.675", options) == "b"
    assert parse_choice("1354", options) == "c"
    assert parse_choice("data inadequate", options) == "d"
    assert parse_choice("12", options) is None
    assert parse_choice("27.6749999", options) == "b"   # float noise from a program
    assert parse_choice("27.7", options) is None        # further than the tolerance


def test_options_written_as_a_python_list():
    question = "how tall ?\n['a ) 12', 'b ) 15', 'c ) c ) 10', 'd ) 8', 'e ) 14']"
    assert parse_mathqa_options(question) == {"a": "12", "b": "15", "c": "10", "d": "8", "e": "14"}
    assert parse_mathqa_options("no options here") == {}


@pytest.mark.parametrize("item_id, kind", [
    ("mathqa_12", "choice"), ("mathqa-numeric_12", "number"), ("gsm8k_0", "number"),
    ("svamp_3", "number"), ("anything", "number"), ("mathqafoo_1", "number"),
])
def test_answer_type_for(item_id, kind):
    assert answer_type_for(item_id) == kind


def test_reward_values():
    cfg = RewardConfig()
    assert judge(72.0, "72", "number", cfg).reward == 1.0
    assert judge(72.009, "72", "number", cfg).reward == 1.0           # within 1e-2
    assert judge(72.02, "72", "number", cfg).reward == 0.1            # extracted, wrong
    assert judge(1000.0, "1,000", "number", cfg).correct              # gold commas stripped
    assert judge(None, "72", "number", cfg).reward == 0.0
    assert judge(72.02, "72", "number", RewardConfig(tolerance=0.05)).reward == 1.0
    assert judge(71.0, "72", "number", RewardConfig(partial_reward=0.0)).reward == 0.0
    # multiple choice: the paper gives no partial reward, the reference code does
    assert judge("c", "c", "choice", cfg).reward == 1.0
    assert judge("b", "c", "choice", cfg).reward == 0.0
    assert judge("b", "c", "choice", RewardConfig(mcq_partial_reward=True)).reward == 0.1
    # ... to every non-correct answer, extracted or not (its MCQ rewards are always 0.1 or 1)
    assert judge(None, "c", "choice", RewardConfig(mcq_partial_reward=True)).reward == 0.1
    assert judge(None, "c", "choice", cfg).reward == 0.0
    assert judge(None, "72", "number", RewardConfig(mcq_partial_reward=True)).reward == 0.0


def test_ncot_scorer_end_to_end():
    scorer = RewardScorer(RewardConfig(cot_type="ncot"))
    responses = [f"2 + 3 = 5\n{T} 5", f"{T} $1,000.", f"{T} 6", "I think it is 5",
                 f"{T} c ) 38", f"{T} b", f"{T} 1,000"]
    golds = ["5", "1000", "5", "5", "c", "c", "1000"]
    kinds = ["number"] * 4 + ["choice", "choice", "number"]
    results = scorer.score(responses, golds, kinds)
    assert [r.reward for r in results] == [1.0, 1.0, 0.1, 0.0, 1.0, 0.0, 1.0]
    assert [r.status for r in results] == ["ok", "ok", "ok", "none", "ok", "ok", "ok"]
    assert results[1].extracted == "1000" and results[4].extracted == "c"
    strict = RewardScorer(RewardConfig(strict_numbers=True)).score(responses[:2], golds[:2],
                                                                   kinds[:2])
    assert [r.reward for r in strict] == [1.0, 0.0]  # the reference's float() fails on "$1,000."


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="reward.cot_type"):
        RewardConfig(cot_type="python")
    with pytest.raises(ValueError, match="reward.partial_reward"):
        RewardConfig(partial_reward=1.5)
    with pytest.raises(ValueError, match="answer_type"):
        RewardScorer().score(["x"], ["1"], ["letter"])
    with pytest.raises(ValueError, match="1 responses but 2 golds"):
        RewardScorer().score(["x"], ["1", "2"], ["number"])

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


# ------------------------------------------------------------------ Galactica: no EOS defined

TEXTS = ["Question:\nTom has 3 apples. How many?\nAnswer reasoning:\n",
         "def solution():\n    apples = 3\n    result = apples\n    return result"] * 20


def galactica_like_tokenizer(directory: Path) -> Path:
    """Byte-level BPE with OPT's special tokens <s>=0, <pad>=1, </s>=2, <unk>=3 and, like
    Galactica's HF tokenizer, neither EOS nor pad declared."""
    import tokenizer_kinds

    tokenizer_kinds.gpt2_bytelevel_dir(TEXTS, directory, vocab_size=300, eos=False)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config.get("eos_token") is None and config.get("pad_token") is None
    return directory


@pytest.fixture
def sys_path_tests(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))


def test_galactica_tokenizer_without_eos_uses_id_2_and_pad_1(tmp_path, caplog, sys_path_tests):
    from megatron_reft.data import load_tokenizer

    path = galactica_like_tokenizer(tmp_path / "galactica")
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(str(path))
    assert (tok.eos_id, tok.pad_id) == (2, 1)
    assert any("defines no EOS" in r.getMessage() and "id 2" in r.getMessage() for r in caplog.records)
    ids = tok.encode(TEXTS[1])
    assert 2 not in ids and tok.decode(ids + [tok.eos_id]) == TEXTS[1]
    # What a training run saves names the adopted tokens; reloading it needs no fallback.
    tok.save(str(tmp_path / "saved"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = load_tokenizer(str(tmp_path / "saved"))
    assert (again.eos_id, again.pad_id) == (2, 1) and not caplog.records


def test_converting_a_galactica_checkpoint_without_eos(tmp_path, caplog, sys_path_tests):
    from conversion_models import random_hf_model, save_hf

    from megatron_reft.checkpoint.convert import hf_to_megatron
    from megatron_reft.data import load_tokenizer

    hf_dir = save_hf(random_hf_model("opt"), tmp_path / "hf")
    galactica_like_tokenizer(hf_dir)
    lines = []
    with caplog.at_level(logging.WARNING):
        hf_to_megatron(hf_dir, tmp_path / "megatron", log=lines.append)
    assert "tokenizer: hf, vocabulary 300, EOS id 2, pad id 1" in lines
    assert any("defines no EOS" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(str(tmp_path / "megatron" / "tokenizer"))
    assert (tok.eos_id, tok.pad_id) == (2, 1)
    assert any("defines no EOS" in r.getMessage() for r in caplog.records)


def test_tokenizer_without_eos_and_without_the_opt_layout_is_refused(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_reft.data import load_tokenizer

    raw = RawTokenizer(models.WordLevel({"<unk>": 0, "Tom": 1, "has": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(str(tmp_path / "t"))
    with pytest.raises(ValueError, match="no EOS token and id 2 is not '</s>'"):
        load_tokenizer(str(tmp_path / "t"))


# ------------------------------------------------------------------ prompts over max_prompt_length

class CharTokenizer:
    """One id per character, so lengths are easy to reason about."""
    eos_id = pad_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_overlong_prompts_truncate_like_the_reference_or_drop():
    from megatron_reft.data import LoadReport, Record, build_rl_prompt, encode_rl_prompts
    from megatron_reft.data.records import MalformedRecordError

    records = [Record(f"svamp_{i}", "q" * length, None, "1") for i, length in enumerate((5, 80, 10, 200))]
    full = [CharTokenizer().encode(build_rl_prompt(r, "pcot")) for r in records]
    limit = 100  # 55 characters + the question twice (prompt and prefill): 65, 215, 75, 455
    assert [len(ids) > limit for ids in full] == [False, True, False, True]

    prompts, kept, report = encode_rl_prompts(CharTokenizer(), records, "pcot", limit, overlong="truncate",
                                              report=LoadReport(source="train prompts"))
    assert prompts == [ids[:limit] for ids in full]  # the reference's prefix[:max_input_length]
    assert [r.id for r in kept] == [r.id for r in records]
    assert (report.loaded, report.truncated, report.num_malformed) == (4, 2, 0)
    assert "4 records kept (2 of them truncated), none rejected." in str(report)
    assert "svamp_1: 215 prompt tokens > max_prompt_length 100" in str(report)

    prompts, kept, report = encode_rl_prompts(CharTokenizer(), records, "pcot", limit)  # default: drop
    assert prompts == [full[0], full[2]] and [r.id for r in kept] == ["svamp_0", "svamp_2"]
    assert (report.loaded, report.truncated, dict(report.malformed)) == (2, 0, {"prompt_too_long": 2})
    with pytest.raises(MalformedRecordError, match="svamp_1: 215 prompt tokens"):
        encode_rl_prompts(CharTokenizer(), records, "pcot", limit, on_malformed="raise")
    # truncation is not an error, even under on_malformed=raise
    assert len(encode_rl_prompts(CharTokenizer(), records, "pcot", limit, "raise", overlong="truncate")[0]) == 4
    with pytest.raises(ValueError, match="overlong must be one of"):
        encode_rl_prompts(CharTokenizer(), records, "pcot", limit, overlong="cut")


def test_the_paper_recipes_truncate_prompts():
    from megatron_reft.config import load_config
    from megatron_reft.config.schema import Config

    assert Config().data.overlong_prompts == "drop"
    reft_ppo = Path(__file__).resolve().parents[1] / "configs" / "reft_ppo.yaml"
    assert load_config(str(reft_ppo)).data.overlong_prompts == "truncate"

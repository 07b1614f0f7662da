"""Loaders and the malformed-record policy, on real files from ../shared/data and on fixtures."""
import json
from pathlib import Path

import pytest

from megatron_reft.data.loaders import load_records, parse_hf_spec, save_records, split_gsm8k_solution
from megatron_reft.data.records import MalformedRecordError, Record, parse_choices

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA} (only present in the development checkout)")
    return DATA


# --- real data ---------------------------------------------------------------------------------


def test_svamp_ncot_file(data):
    records, report = load_records(str(data / "mwp_reft/svamp_nl.json"), "ncot")
    assert (len(records), report.num_malformed) == (3076, 0)
    first = records[0]
    assert first.id == "svamp_0" and first.answer == "203.0" and first.answer_type == "number"
    assert first.cot.endswith("Therefore, Tyler has a total of 203 pairs of birds in the bird sanctuary."
                              "\n\nTherefore, the answer is <203>.")
    assert "3076 records kept, none rejected" in str(report)


def test_svamp_pcot_file_and_wrong_cot_type(data):
    records, _ = load_records(str(data / "mwp_reft/svamp_python_sdp.json"), "pcot")
    assert len(records) == 3043
    assert records[1].cot.startswith('def solution():\n    """Iesha has 344 books.')
    # N-CoT text where programs are expected is malformed, counted by reason, and nothing is left.
    with pytest.raises(ValueError, match="cot_not_a_program 3076"):
        load_records(str(data / "mwp_reft/svamp_nl.json"), "pcot")
    # ... unless CoTs are not needed (RL/eval): then the wrong kind is dropped, records kept.
    records, report = load_records(str(data / "mwp_reft/svamp_nl.json"), "pcot", require_cot=False)
    assert len(records) == 3076 and records[0].cot is None and report.num_malformed == 0


def test_gsm8k_jsonl_real_lines(data):
    records, report = load_records(str(data / "gsm8k/train.jsonl"))
    assert (len(records), report.num_malformed, report.fmt) == (7473, 0, "gsm8k (json lines)")
    assert records[0] == Record(
        id="gsm8k_0",
        question="Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
        cot="Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.",
        answer="72")
    assert not any("<<" in r.cot or ">>" in r.cot or "####" in r.cot for r in records)


def test_gsm8k_test_jsonl_matches_reft_authors_test_set(data):
    ours, _ = load_records(str(data / "gsm8k/test.jsonl"), require_cot=False)
    theirs, _ = load_records(str(data / "mwp_reft/gsm8k_test_set.json"), require_cot=False)
    assert [r.id for r in ours] == [r.id for r in theirs]
    assert [r.answer for r in ours] == [r.answer for r in theirs]  # thousands separators removed
    assert ours[146].answer == "2125"  # "#### 2,125" in the OpenAI file


def test_mathqa_choices_and_answer_types(data):
    mcq, _ = load_records(str(data / "mwp_reft/mathqa_test_set.json"), require_cot=False)
    assert len(mcq) == 1605 and all(r.answer_type == "choice" for r in mcq)
    assert mcq[0].choices == {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate", "e": "none of these"}
    assert all(r.answer in r.choices and len(r.choices) == 5 for r in mcq)
    numeric, _ = load_records(str(data / "mwp_reft/mathqa-numeric_test_set.json"), require_cot=False)
    assert numeric[0].answer_type == "number" and numeric[0].dataset == "mathqa-numeric"
    assert numeric[0].answer == "38.0"


def test_test_sets_need_require_cot_false(data):
    with pytest.raises(ValueError, match="missing_cot 1000"):
        load_records(str(data / "mwp_reft/svamp_test_set.json"))


def test_hf_local_file(data):
    records, report = load_records("hf:" + str(data / "gsm8k/test.jsonl"))
    assert len(records) == 1319 and records[0].id == "gsm8k_0" and records[0].answer == "18"


# --- fixtures ------------------------------------------------------------------------------------

GOOD = {"id": "toy_0", "question": "Tom has 2 apples. He buys 3 more. How many?", "cot": "2 + 3 = 5.", "answer": "5"}
BAD_LINES = [
    json.dumps(GOOD),
    json.dumps({"id": "toy_1", "question": "  ", "cot": "x", "answer": "1"}),         # missing_question
    json.dumps({"id": "toy_2", "question": "q", "cot": "x", "answer": "five"}),       # non_numeric_answer
    '{"id": "toy_3", "question": ',                                                    # invalid_json
    json.dumps({**GOOD, "question": "another"}),                                      # duplicate_id
    json.dumps({"id": "toy_5", "question": "q", "answer": "1"}),                      # missing_cot
    json.dumps({"id": "toy_6", "question": "q", "cot": "def solution():\n    return 1", "answer": "1"}),
    json.dumps({"id": "toy_7", "question": "q", "cot": "c", "answer": "1,000"}),      # fine: commas allowed
]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_malformed_records_are_counted(tmp_path):
    path = write(tmp_path, "toy.jsonl", "\n".join(BAD_LINES) + "\n\n")
    records, report = load_records(path)
    assert [r.id for r in records] == ["toy_0", "toy_7"]
    assert dict(report.malformed) == {"missing_question": 1, "non_numeric_answer": 1, "invalid_json": 1,
                                      "duplicate_id": 1, "missing_cot": 1, "cot_is_a_program": 1}
    text = str(report)
    assert "2 records kept, 6 rejected" in text and "record 2: toy_2: answer 'five' is not a number" in text


def test_malformed_records_raise_with_file_index_and_reason(tmp_path):
    path = write(tmp_path, "toy.jsonl", "\n".join(BAD_LINES))
    with pytest.raises(MalformedRecordError, match=r"toy\.jsonl: record 1: missing_question"):
        load_records(path, on_malformed="raise")
    with pytest.raises(ValueError, match="on_malformed"):
        load_records(path, on_malformed="ignore")


def test_mwp_reft_fixture_and_choice_validation(tmp_path):
    rows = [{"item_id": "mathqa_0", "question": "q ?\na ) 1 , b ) 2 , c ) 3 , d ) 4 , e ) 5", "answer_value": "b",
             "answer_cot": "it is b"},
            {"item_id": "mathqa_1", "question": "q ?\na ) 1 , b ) 2", "answer_value": "e", "answer_cot": "e"},
            {"item_id": "mathqa_2", "question": "no options here", "answer_value": "a", "answer_cot": "a"},
            {"item_id": "svamp_3", "question": "q", "answer_value": 7.0, "answer_cot": "c"}]
    records, report = load_records(write(tmp_path, "m.json", json.dumps(rows)))
    assert [r.id for r in records] == ["mathqa_0", "svamp_3"]
    assert records[1].answer == "7.0"  # numbers in the JSON become the same string the files use
    assert dict(report.malformed) == {"answer_not_a_choice": 1, "missing_choices": 1}


def test_gsm8k_fixture_missing_final_answer(tmp_path):
    lines = [json.dumps({"question": "q1", "answer": "a <<1+1=2>>2 b\n#### 1,234"}),
             json.dumps({"question": "q2", "answer": "no final line"})]
    records, report = load_records(write(tmp_path, "g.jsonl", "\n".join(lines)))
    assert records == [Record(id="gsm8k_0", question="q1", cot="a 2 b", answer="1234")]
    assert dict(report.malformed) == {"missing_final_answer": 1}


def test_gsm8k_pcot_requires_require_cot_false(tmp_path):
    path = write(tmp_path, "g.jsonl", json.dumps({"question": "q", "answer": "x\n#### 3"}))
    with pytest.raises(ValueError, match="natural-language solutions only"):
        load_records(path, "pcot")
    records, _ = load_records(path, "pcot", require_cot=False)
    assert records[0].cot is None and records[0].answer == "3"


def test_save_and_reload_roundtrip(tmp_path):
    records = [Record("toy_0", "q?", "c", "5"), Record("mathqa_1", "q\na ) 1 , b ) 2", None, "a",
                                                       {"a": "1", "b": "2"}, {"note": 1})]
    path = str(tmp_path / "out" / "r.jsonl")
    save_records(records, path)
    loaded, report = load_records(path, require_cot=False)
    assert loaded == records and report.fmt == "jsonl (json lines)"


def test_unknown_schema_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_records(write(tmp_path, "x.jsonl", json.dumps({"problem": "q", "solution": "s"})))


def test_split_gsm8k_solution_and_parsers():
    assert split_gsm8k_solution("He pays 2*3=<<2*3=6>>6.\n#### 6") == ("He pays 2*3=6.", "6")
    assert parse_hf_spec("hf:openai/gsm8k@main:test") == ("openai/gsm8k", "main", "test")
    assert parse_hf_spec("hf:/data/x.jsonl") == ("/data/x.jsonl", None, None)
    assert parse_choices("q\n['a ) 12', 'b ) 1 / 8 ohms', 'c ) c ) 5']") == {"a": "12", "b": "1 / 8 ohms", "c": "5"}


def test_broken_json_list_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_records(write(tmp_path, "broken.json", '[{"item_id": "svamp_0", '))


def test_hf_with_forced_schema(tmp_path):
    path = write(tmp_path, "g.jsonl", json.dumps({"question": "q", "answer": "x\n#### 3"}))
    records, report = load_records("hf:" + path, fmt="gsm8k")
    assert records[0].answer == "3" and report.fmt.startswith("gsm8k (hf datasets")


# --- runtime.load_data: each split from its own source -----------------------------------------


def _mixed_sources_config(tmp_path, train_file, eval_file):
    from megatron_reft.config import load_config

    return load_config(None, [f"data.train_file={train_file}", f"data.eval_file={eval_file}",
                              "data.synthetic_train_items=30", "data.synthetic_eval_items=7",
                              f"trainer.output_dir={tmp_path / 'run'}"])


def _records_file(tmp_path) -> str:
    rows = [{"item_id": f"mine_{i}", "question": f"Tom has {i} apples and gets 2 more. How many?",
             "answer_cot": f"{i} + 2 = {i + 2}. Therefore, the answer is <{i + 2}>.", "answer_value": str(i + 2)}
            for i in range(5)]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_real_train_file_with_synthetic_eval_keeps_each_source(tmp_path):
    """Bug found in the tiny-task matrix: a real train file with `eval_file: synthetic` used to
    bring back the synthetic *train* split and ignore the file."""
    from megatron_reft.runtime import load_data

    data = load_data(_mixed_sources_config(tmp_path, _records_file(tmp_path), "synthetic"))
    assert [r.id for r in data.train] == [f"mine_{i}" for i in range(5)]
    assert len(data.eval) == 7 and not any(r.id.startswith("mine_") for r in data.eval)


def test_synthetic_train_with_real_eval_file_reads_the_file(tmp_path):
    from megatron_reft.runtime import load_data

    data = load_data(_mixed_sources_config(tmp_path, "synthetic", _records_file(tmp_path)))
    assert len(data.train) == 30 and not any(r.id.startswith("mine_") for r in data.train)
    assert [r.id for r in data.eval] == [f"mine_{i}" for i in range(5)]
    both = load_data(_mixed_sources_config(tmp_path, "synthetic", "null"))
    assert len(both.eval) == 7  # no eval file: the synthetic held-out split, as documented

"""`megatron-reft score`: gold CoTs and response files, both input formats, summary and --out."""
import json

import pytest

from megatron_reft.cli import main as megatron_reft

ITEMS = [
    {"item_id": "svamp_1", "question": "2 + 3?", "answer_value": "5",
     "answer_cot": "def solution():\n    \"\"\"2 + 3?\"\"\"\n    result = 2 + 3\n    return result"},
    {"item_id": "svamp_2", "question": "1000 * 1?", "answer_value": "1,000",
     "answer_cot": "def solution():\n    result = 1000\n    return result"},
    {"item_id": "mathqa_3", "question": "pick\na ) 38 , b ) 27.675 , c ) 30 , d ) 1 , e ) 2",
     "answer_value": "b", "answer_cot": "def solution():\n    return 27.675"},
]


def run(capsys, *argv):
    code = megatron_reft(["score", *map(str, argv)])
    out = capsys.readouterr().out
    return code, (json.loads(out) if code == 0 else None)


def test_gold_programs(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ITEMS))
    out = tmp_path / "scored.jsonl"
    code, summary = run(capsys, "--data", data, "--cot", "pcot", "--out", out)
    assert code == 0
    assert (summary["n"], summary["correct"], summary["partial"], summary["none"]) == (3, 3, 0, 0)
    assert summary["status"] == {"ok": 3} and summary["mean_reward"] == 1.0
    assert "sandbox isolation" in summary["sandbox"]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(l["id"], l["reward"], l["extracted"]) for l in lines] == [
        ("svamp_1", 1.0, "5"), ("svamp_2", 1.0, "1000"), ("mathqa_3", 1.0, "b")]


def test_gold_ncot_from_jsonl(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [{"id": "gsm8k_0", "question": "q", "cot": "2 + 2 = 4", "answer": "4"},
            {"id": "mathqa_1", "question": "q\na ) 1 , b ) 2", "cot": "it is a", "answer": "a"}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    code, summary = run(capsys, "--data", data, "--cot", "ncot")
    assert code == 0 and summary["correct"] == 2 and summary["robust_only"] == 0


def test_responses(tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(ITEMS))
    responses = tmp_path / "responses.jsonl"
    responses.write_text("\n".join(json.dumps(r) for r in [
        {"id": "svamp_1", "response": "Adding gives 5.\nTherefore, the answer is: 5"},
        {"id": "svamp_2", "response": "Therefore, the answer is: $1,000."},
        {"id": "mathqa_3", "response": "Therefore, the answer is: c"},
    ]))
    code, summary = run(capsys, "--data", data, "--cot", "ncot", "--responses", responses)
    assert code == 0
    assert (summary["correct"], summary["partial"], summary["none"]) == (2, 1, 0)
    assert summary["robust_only"] == 1  # "$1,000." needs the robust parser
    assert summary["mean_reward"] == pytest.approx(2 / 3, abs=1e-4)  # wrong MCQ letter: no partial reward
    code, summary = run(capsys, "--data", data, "--cot", "ncot", "--responses", responses,
                        "--strict-numbers", "--mcq-partial-reward")
    assert (summary["correct"], summary["partial"], summary["none"]) == (1, 1, 1)
    assert summary["mean_reward"] == pytest.approx((1 + 0.1) / 3, abs=1e-4)


def test_errors_exit_2(tmp_path, capsys):
    data = tmp_path / "test_set.json"
    data.write_text(json.dumps([{"item_id": "gsm8k_0", "question": "q", "answer_value": "1"}]))
    assert megatron_reft(["score", "--data", str(data), "--cot", "ncot"]) == 2
    assert "no gold CoTs" in capsys.readouterr().err
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"id": "gsm8k_9", "response": "x"}))
    assert megatron_reft(["score", "--data", str(data), "--cot", "ncot",
                          "--responses", str(responses)]) == 2
    assert "'gsm8k_9' is not in" in capsys.readouterr().err

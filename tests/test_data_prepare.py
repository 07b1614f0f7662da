"""`megatron-reft data prepare|check`: the paper recipes' files, their counts (reft.md §7) and schema."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_reft.data import prepare

REPO = Path(__file__).resolve().parents[1]


def _fake_sources(root: Path) -> tuple[Path, Path]:
    mwp = root / "mwp_ReFT" / "data"
    mwp.mkdir(parents=True)
    (mwp / "svamp_python_sdp.json").write_text(json.dumps([
        {"item_id": "svamp_0", "question": "3 and 4?", "answer_cot": "def solution():\n    return 3 + 4",
         "answer_value": "7.0"}]))
    (mwp / "svamp_test_set.json").write_text(json.dumps([
        {"item_id": "svamp_0", "question": "1 and 1?", "answer_value": "2"},
        {"item_id": "svamp_1", "question": "bad", "answer_value": "not a number"}]))
    gsm8k = root / "gsm8k"
    gsm8k.mkdir()
    (gsm8k / "train.jsonl").write_text(json.dumps(
        {"question": "48 clips, half as many in May. Total?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nIn total 48+24 = <<48+24=72>>72.\n#### 1,072"}) + "\n")
    return mwp, gsm8k


def test_every_recipe_file_is_known():
    names = prepare.recipe_files(REPO / "configs")
    assert names and names <= set(prepare.EXPECTED)


def test_prepare_copies_released_files_builds_gsm8k_and_check_reports(tmp_path, capsys):
    mwp, gsm8k = _fake_sources(tmp_path)
    out = tmp_path / "data"
    code = prepare.main(["prepare", "--dir", str(out), "--mwp-reft", str(mwp), "--gsm8k", str(gsm8k),
                         "--configs", str(REPO / "configs")])
    text = capsys.readouterr().out
    assert code == 1  # unpublished files are still missing
    assert "wrote svamp_python_sdp.json, svamp_test_set.json, gsm8k_nl.json" in text
    assert [json.loads((out / "gsm8k_nl.json").read_text())[0][k] for k in ("item_id", "answer_value")] == [
        "gsm8k_0", "1072"]
    assert "<<" not in (out / "gsm8k_nl.json").read_text()
    lines = {line.split()[0]: line for line in text.splitlines() if line.endswith((".json", "ok")) or "items" in line
             or "missing" in line}
    assert "1 items  differs from the paper's 3043" in lines["svamp_python_sdp.json"]
    assert "1 items, 1 malformed" in lines["svamp_test_set.json"]
    assert "missing" in lines["gsm8k_python_sdp.json"] and "not published" in lines["gsm8k_python_sdp.json"]
    before = (out / "gsm8k_nl.json").stat().st_mtime_ns
    prepare.main(["prepare", "--dir", str(out), "--gsm8k", str(gsm8k), "--configs", str(REPO / "configs")])
    assert "wrote nothing new" in capsys.readouterr().out
    assert (out / "gsm8k_nl.json").stat().st_mtime_ns == before  # never overwritten


def test_bad_source_directory_is_one_line_exit_2(tmp_path, capsys):
    assert prepare.main(["prepare", "--dir", str(tmp_path / "d"), "--mwp-reft", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"megatron-reft data: --mwp-reft: not a directory: {tmp_path / 'nope'}"
    assert not (tmp_path / "d").exists()


def test_released_files_have_the_papers_counts(shared_data, tmp_path, capsys):
    out = tmp_path / "data"
    prepare.prepare(out, shared_data / "mwp_reft", shared_data / "gsm8k")
    for name in prepare.RELEASED:
        status = prepare.check_file(out / name)
        assert (status.count, status.malformed) == (prepare.EXPECTED[name], 0), name
    assert prepare.check_file(out / "gsm8k_nl.json").count == 7473  # OpenAI's train split

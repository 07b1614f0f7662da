"""A small reader for the dataset files `megatron-reft score` accepts, as {id, question, cot,
answer} dicts (cot None when the file has none, e.g. test sets):

* the ReFT authors' JSON: a list of {item_id, question, answer_cot, answer_value};
* JSON lines {id, question, cot, answer};
* OpenAI GSM8K JSON lines {question, answer} whose answer ends with '#### 72'.

Kept local to the reward package so the score command does not depend on the training data
pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_records(path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [_record(row, index, path) for index, row in enumerate(rows)]


def read_responses(path) -> list[dict]:
    """JSON lines {id, response}."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("response"), str):
            raise ValueError(f"{path}:{number}: expected {{\"id\": ..., \"response\": \"...\"}}")
        rows.append({"id": str(row["id"]), "response": row["response"]})
    return rows


def _record(row, index: int, path) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{path}: item {index} is not an object")
    if "answer_value" in row:  # ReFT authors' format
        return {"id": str(row.get("item_id", index)), "question": row.get("question", ""),
                "cot": row.get("answer_cot"), "answer": str(row["answer_value"])}
    if "id" in row and "answer" in row:
        return {"id": str(row["id"]), "question": row.get("question", ""),
                "cot": row.get("cot"), "answer": str(row["answer"])}
    if "answer" in row and "####" in str(row["answer"]):  # OpenAI GSM8K
        cot, answer = str(row["answer"]).rsplit("####", 1)
        return {"id": f"gsm8k_{index}", "question": row.get("question", ""),
                "cot": cot.strip(), "answer": answer.strip()}
    raise ValueError(f"{path}: item {index} has neither answer_value nor id+answer "
                     f"(keys: {sorted(row)})")

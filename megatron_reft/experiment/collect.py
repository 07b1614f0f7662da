"""Reading the numbers of a cell from what the jobs wrote (no model, no torch):

- Table 1: a run directory's metrics.jsonl, the `eval_accuracy` the SFT / online-ST / PPO trainers
  log at every evaluation (the best one by default: reft.md §6 "SFT, best epoch"), or the
  `accuracy` of an eval JSON line;
- Table 2: `maj_at_k` / `rerank_at_k` of `megatron-reft eval --samples K [--reranker R]`'s JSON line.

A cell that cannot be filled is {"value": None, "reason": ...}: the tables print "–" and the JSON
keeps the reason.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str) -> list[dict] | None:
    """metrics.jsonl's rows (a line cut by an interruption is skipped); None when there is no file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def accuracy_curve(rows: list[dict]) -> list[dict]:
    """[{step, epoch, accuracy}] of every evaluation, in step order; a resumed run may log a step
    twice (the later line wins)."""
    by_step = {}
    for row in rows:
        if row.get("eval_accuracy") is not None:
            by_step[row["step"]] = {"step": row["step"], "epoch": row.get("epoch", row["step"]),
                                    "accuracy": float(row["eval_accuracy"])}
    return [by_step[s] for s in sorted(by_step)]


def read_eval_line(path: str) -> dict | None:
    """The last JSON object line holding `accuracy` in `path` (the eval command's stdout, or a log
    that contains it); None when there is none."""
    file = Path(path)
    if not file.is_file():
        return None
    found = None
    for line in file.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict) and "accuracy" in item:
                found = item
    return found


def missing(reason: str) -> dict:
    return {"value": None, "reason": reason}


def table1_cell(entry) -> dict:
    """Greedy accuracy of one method on one dataset/CoT: from eval_json when given, else the
    run directory's evaluations."""
    if entry.eval_json:
        line = read_eval_line(entry.eval_json)
        if line is None:
            return missing(f"{entry.eval_json}: no eval JSON line with accuracy (has the eval run?)")
        return {"value": float(line["accuracy"]), "source": entry.eval_json, "n": line.get("n"),
                "checkpoint": line.get("checkpoint")}
    rows = read_metrics(entry.run_dir)
    if rows is None:
        return missing(f"{entry.run_dir}: no metrics.jsonl (has the run started?)")
    curve = accuracy_curve(rows)
    if not curve:
        return missing(f"{entry.run_dir}/metrics.jsonl: no eval_accuracy logged "
                       "(data.eval_file unset, trainer.eval_accuracy off, or no evaluation reached yet)")
    # best: the first evaluation reaching the maximum (the `best` checkpoint SFT keeps is that one)
    chosen = curve[-1] if entry.select == "last" else max(curve, key=lambda p: (p["accuracy"], -p["step"]))
    return {"value": chosen["accuracy"], "source": f"{entry.run_dir}/metrics.jsonl", "select": entry.select,
            "step": chosen["step"], "epoch": chosen["epoch"], "evaluations": len(curve)}


def table2_cells(entry) -> dict:
    """{"voting": cell, "reranking": cell} of one eval --samples output."""
    line = read_eval_line(entry.eval_json)
    if line is None:
        reason = f"{entry.eval_json}: no eval JSON line (has `eval --samples` run?)"
        return {"voting": missing(reason), "reranking": missing(reason)}
    base = {"source": entry.eval_json, "k": line.get("k"), "greedy_accuracy": line.get("accuracy"),
            "pass_at_k": line.get("pass_at_k"), "sampled_items": line.get("sampled_items")}
    cells = {}
    for kind, key, why in (("voting", "maj_at_k", "eval ran without --samples"),
                           ("reranking", "rerank_at_k", "eval ran without --reranker")):
        cells[kind] = ({**base, "value": float(line[key])} if line.get(key) is not None
                       else {**missing(f"{entry.eval_json}: no {key} ({why})"), "k": line.get("k")})
    return cells

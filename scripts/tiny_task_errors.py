"""Where greedy answers on the held-out-equations task (synthetic level 6) go wrong.

    megatron-reft eval --config configs/demo_cpu.yaml --ckpt CKPT --out preds.jsonl
    python scripts/tiny_task_errors.py preds.jsonl [more.jsonl ...] [--train-items 2000 --seed 0]

For each predictions file (one JSON per item: response, correct) it counts the equations the
responses write that no train CoT shows ("unseen") and how many of them are right, and splits the
wrong items by cause: a wrong unseen equation, a wrong seen equation, or neither (a misread
operand or step). docs/benchmarks.md, "Tiny-task matrix", uses it as evidence.
"""
from __future__ import annotations

import argparse
import json
import re

from megatron_reft.data.synthetic import make_synthetic_records
from megatron_reft.data.synthetic_heldout import record_equations

EQUATION = re.compile(r"(\d+) ([-+]) (\d+) = (\d+)")


def _is_right(a: str, symbol: str, b: str, c: str) -> bool:
    return (int(a) + int(b) if symbol == "+" else int(a) - int(b)) == int(c)


def error_counts(predictions: list[dict], train_equations: set) -> dict:
    counts = dict(items=0, correct=0, unseen_written=0, unseen_right=0, wrong_items=0,
                  wrong_unseen=0, wrong_seen=0, wrong_other=0)
    for p in predictions:
        equations = EQUATION.findall(p["response"])
        unseen = [e for e in equations if (int(e[0]), e[1], int(e[2])) not in train_equations]
        counts["items"] += 1
        counts["correct"] += bool(p["correct"])
        counts["unseen_written"] += len(unseen)
        counts["unseen_right"] += sum(_is_right(*e) for e in unseen)
        if p["correct"]:
            continue
        bad_unseen = any(not _is_right(*e) for e in unseen)
        bad_seen = any(not _is_right(*e) for e in equations if e not in unseen)
        counts["wrong_items"] += 1
        counts["wrong_unseen"] += bad_unseen
        counts["wrong_seen"] += bad_seen
        counts["wrong_other"] += not (bad_unseen or bad_seen)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", nargs="+")
    parser.add_argument("--train-items", type=int, default=2000, help="data.synthetic_train_items")
    parser.add_argument("--seed", type=int, default=0, help="data.synthetic_seed")
    args = parser.parse_args(argv)
    train = make_synthetic_records(args.train_items, args.seed, 6)
    table = {eq for record in train for eq in record_equations(record.meta["ncot"])}
    for path in args.predictions:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print(json.dumps({"file": path, **error_counts(rows, table)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

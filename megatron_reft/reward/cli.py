"""`megatron-reft score`: score a dataset's gold CoTs (a data-quality check), or model
responses against the dataset's answers.

    megatron-reft score --data svamp_python_sdp.json --cot pcot
    megatron-reft score --data gsm8k_test_set.json --cot ncot --responses out.jsonl --out scored.jsonl

Responses are JSON lines {id, response}, where response is what the model wrote after the
prompt's "Answer reasoning:\\n" (for P-CoT the whole program, `def solution():` included).
Prints a JSON summary; with --out, one JSON line per item {id, reward, extracted, status, correct}.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
import time

from .extract import ANSWER_TRIGGER, answer_type_for, extract_ncot_answer, parse_number
from .records import read_records, read_responses
from .score import RewardConfig, RewardScorer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-reft score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset file (ReFT JSON, or JSON lines)")
    parser.add_argument("--cot", required=True, choices=("ncot", "pcot"))
    parser.add_argument("--responses", help="JSON lines {id, response}; default: the gold CoTs")
    parser.add_argument("--out", help="write one JSON line per item here")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per program (pcot)")
    parser.add_argument("--workers", type=int, default=2, help="sandbox workers (pcot)")
    parser.add_argument("--partial-reward", type=float, default=0.1)
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--strict-numbers", action="store_true",
                        help="parse numbers like the reference's float()")
    parser.add_argument("--mcq-partial-reward", action="store_true",
                        help="the reference's MCQ rule: every wrong letter gets the partial reward")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="fork every program, statically pure ones included (pcot)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config = RewardConfig(cot_type=args.cot, partial_reward=args.partial_reward,
                              tolerance=args.tolerance, strict_numbers=args.strict_numbers,
                              mcq_partial_reward=args.mcq_partial_reward, timeout_s=args.timeout,
                              num_workers=args.workers, fast_path=not args.no_fast_path)
        records = read_records(args.data)
        items = _items_to_score(records, args)
    except (OSError, ValueError) as err:
        print(f"megatron-reft score: {err}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    with RewardScorer(config) as scorer:
        results = scorer.score([i["response"] for i in items], [i["answer"] for i in items],
                               [i["answer_type"] for i in items], [i["question"] for i in items])
        isolation = scorer.isolation_summary
    seconds = time.perf_counter() - start

    summary = _summary(items, results, seconds, args)
    if isolation:
        summary["sandbox"] = isolation
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            for item, result in zip(items, results):
                out.write(json.dumps({"id": item["id"], "reward": result.reward,
                                      "extracted": result.extracted, "status": result.status,
                                      "correct": result.correct}) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


def _items_to_score(records, args) -> list[dict]:
    """What to score: gold CoTs turned into what the model would write, or the given responses."""
    by_id = {r["id"]: r for r in records}
    if args.responses:
        pairs = []
        for row in read_responses(args.responses):
            if row["id"] not in by_id:
                raise ValueError(f"{args.responses}: id {row['id']!r} is not in {args.data}")
            pairs.append((by_id[row["id"]], row["response"]))
    else:
        with_cot = [r for r in records if r["cot"]]
        if not with_cot:
            raise ValueError(f"{args.data} has no gold CoTs (test sets have none); "
                             "pass --responses to score model outputs")
        pairs = [(r, _gold_response(r, args.cot)) for r in with_cot]
    return [{"id": r["id"], "question": r["question"], "answer": r["answer"],
             "answer_type": answer_type_for(r["id"]), "response": response}
            for r, response in pairs]


def _gold_response(record: dict, cot_type: str) -> str:
    """The training target (reft.md §2): N-CoT gets the answer sentence appended."""
    if cot_type == "ncot":
        return f"{record['cot'].strip()}\n{ANSWER_TRIGGER} {record['answer']}"
    return record["cot"]


def _summary(items, results, seconds, args) -> dict:
    statuses = collections.Counter(r.status for r in results)
    correct = sum(r.correct for r in results)
    extracted = sum(r.extracted is not None for r in results)
    summary = {
        "data": args.data, "cot": args.cot, "responses": args.responses or "gold",
        "n": len(results), "correct": correct, "partial": extracted - correct,
        "none": len(results) - extracted,
        "accuracy": round(correct / len(results), 4) if results else 0.0,
        "mean_reward": round(sum(r.reward for r in results) / len(results), 4) if results else 0.0,
        "status": dict(statuses.most_common()), "seconds": round(seconds, 3),
    }
    if args.cot == "ncot" and not args.strict_numbers:
        # how often robust number parsing matters: answers the reference's float() would miss
        summary["robust_only"] = sum(
            r.extracted is not None and i["answer_type"] == "number"
            and parse_number(extract_ncot_answer(i["response"]), strict=True) is None
            for i, r in zip(items, results))
    return summary

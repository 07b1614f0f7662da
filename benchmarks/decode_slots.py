"""Decode-slot utilisation on unequal response lengths: today's static engine vs continuous batching.

Counts, for response lengths drawn from the synthetic task (the quickstart's gold CoT lengths;
ppo_step.synthetic_response_lengths), how many decode row-steps each scheduling policy computes
for the tokens it produces — the quantity `GenerationOutput.decode_row_steps` records on real
runs. No model runs: the policies are replayed exactly on the lengths.

- static: one batch of `--slots` rows decodes until its longest response is done (no compaction);
- compacting: today's `generate` — finished rows leave the batch once a quarter of it has
  finished (COMPACT_WHEN_ACTIVE_BELOW); computed rows are mostly useful, but the batch shrinks,
  so the slots the hardware was sized for sit idle (`slot_occupancy`);
- continuous: a freed slot takes the next waiting prompt at once (what megatron-core's dynamic
  engine does; docs/architecture.md) — the batch stays full until the queue drains.

    python benchmarks/decode_slots.py [--prompts 128] [--slots 32] [--limit 64]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def static(lengths: list[int], slots: int, compact_below: float | None) -> dict:
    """Chunks of `slots` prompts decoded one after another (rollout's generation_micro_batch)."""
    computed = occupied = 0
    for start in range(0, len(lengths), slots):
        remaining = sorted(lengths[start:start + slots])
        rows, step = len(remaining), 0
        while any(n > step for n in remaining):
            computed += rows
            occupied += slots
            step += 1
            active = sum(n > step for n in remaining)
            if compact_below is not None and active < compact_below * rows:
                rows = active
    return {"row_steps": computed, "slot_steps": occupied}


def continuous(lengths: list[int], slots: int) -> dict:
    queue, running, computed, occupied = list(lengths), [], 0, 0
    while queue or running:
        while queue and len(running) < slots:
            running.append(queue.pop(0))
        computed += len(running)
        occupied += slots
        running = [n - 1 for n in running if n > 1]
    return {"row_steps": computed, "slot_steps": occupied}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--limit", type=int, default=64, help="longest response (lengths are scaled to it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from ppo_step import synthetic_response_lengths

    from megatron_reft.generation.generate import COMPACT_WHEN_ACTIVE_BELOW

    lengths = synthetic_response_lengths(args.prompts, args.limit, args.seed)
    tokens = sum(lengths)
    result = {"prompts": args.prompts, "slots": args.slots, "tokens": tokens,
              "mean_length": tokens / len(lengths), "max_length": max(lengths)}
    for name, counts in (("static", static(lengths, args.slots, None)),
                         ("compacting", static(lengths, args.slots, COMPACT_WHEN_ACTIVE_BELOW)),
                         ("continuous", continuous(lengths, args.slots))):
        result[name] = {**counts, "useful_share_of_computed_rows": round(tokens / counts["row_steps"], 3),
                        "slot_occupancy": round(tokens / counts["slot_steps"], 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

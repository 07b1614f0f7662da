"""The sampler's share of a decode step: choosing and scoring the next token from the last
position's full-vocabulary fp32 logits, ours against the way it was done before, one process.
Prints one JSON object.

    python benchmarks/sampling.py                      # rows 32 and 128, vocabularies 384 to 128k
    python benchmarks/sampling.py --rows 32 --vocab 32016 --repeats 7

Per (rows, vocabulary), interleaved repeats (A B A B …) of:

- `draw_flat`: inverse transform sampling over one float64 cumulative sum of the whole row
  (the engine's sampler before); `draw`: `sampling.sample_from`, two levels (block sums, then
  one block);
- `draw_and_score_separate`: `next_tokens`, then `token_logprobs_and_entropy` on the same
  logits (the rollout before: two full-vocabulary softmax passes, old log-probs for
  ppo.old_logprobs_from_rollout); `draw_and_score`: `sampling.sample_and_score` (reft.md
  rollouts, T = 1 and no top-k/top-p: one softmax serves both).

Times are medians in ms per call; ratios are medians of per-repeat ratios with min–max
(shared/reference/measuring.md). `rows_drawn_differently` counts the rows whose token
differs within each pair for the same seed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="32,128", help="comma-separated decode batch sizes")
    p.add_argument("--vocab", default="384,32016,49152,128256", help="comma-separated vocabulary sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=20, help="calls per timed repeat")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def draw_flat(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The sampler before: one float64 cumulative sum of the whole row."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def methods():
    from megatron_reft.generation.sampling import (SamplingParams, next_tokens, sample_and_score, sample_from,
                                                   token_logprobs_and_entropy)

    params = SamplingParams()

    def separate(logits, g):  # the rollout before: softmax + flat draw, then a second scoring pass
        tokens = draw_flat(logits.softmax(dim=-1), g)
        return tokens, *token_logprobs_and_entropy(logits, tokens, 1.0)

    return {
        "draw_flat": lambda logits, g: draw_flat(logits.softmax(dim=-1), g),
        "draw": lambda logits, g: next_tokens(logits, params, g),
        "draw_and_score_separate": separate,
        "draw_and_score": lambda logits, g: sample_and_score(logits, params, g, 1.0),
    }


def time_calls(fn, logits: torch.Tensor, calls: int) -> float:
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(calls):
        fn(logits, g)
    return (time.perf_counter() - start) / calls * 1e3


def measure(rows: int, vocab: int, args) -> dict:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows + vocab)) * 3
    fns = methods()
    first = {name: fn(logits, torch.Generator().manual_seed(1)) for name, fn in fns.items()}
    # Rows whose token differs from the flat sampler's for the same uniform: the block sums are
    # fp32, so a token boundary can move by float rounding (expected: 0, rarely 1 at 128k).
    draws_differ = {"draw": int((first["draw"] != first["draw_flat"]).sum()),
                    "draw_and_score": int((first["draw_and_score"][0] != first["draw_and_score_separate"][0]).sum())}
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(time_calls(fn, logits, args.calls))
    medians = {name: round(statistics.median(t), 4) for name, t in times.items()}

    def ratio(before, after):
        r = [b / a for b, a in zip(times[before], times[after])]
        return {"median": round(statistics.median(r), 2), "min": round(min(r), 2), "max": round(max(r), 2)}

    return {"rows": rows, "vocab": vocab, "ms_per_call": medians, "rows_drawn_differently": draws_differ,
            "draw_speedup": ratio("draw_flat", "draw"),
            "draw_and_score_speedup": ratio("draw_and_score_separate", "draw_and_score")}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [measure(rows, vocab, args) for rows in map(int, args.rows.split(","))
               for vocab in map(int, args.vocab.split(","))]
    print(json.dumps({"threads": args.threads, "repeats": args.repeats, "calls": args.calls,
                      "torch": torch.__version__, "load_average": os.getloadavg(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

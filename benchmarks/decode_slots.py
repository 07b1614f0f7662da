"""Decode-slot utilisation on unequal response lengths: today's static engine vs continuous batching.

Counts, for response lengths drawn from the synthetic task (the quickstart's gold CoT lengths,
difficulty 6 since 2026-11-29 18:00 UTC — earlier figures in docs/benchmarks.md used difficulty
1; ppo_step.synthetic_response_lengths), how many decode row-steps each scheduling policy computes
for the tokens it produces — the quantity `GenerationOutput.decode_row_steps` records on real
runs. No model runs: the policies are replayed exactly on the lengths.

- static: one batch of `--slots` rows decodes until its longest response is done (no compaction);
- compacting: today's `generate` — finished rows leave the batch once a quarter of it has
  finished (COMPACT_WHEN_ACTIVE_BELOW); computed rows are mostly useful, but the batch shrinks,
  so the slots the hardware was sized for sit idle (`slot_occupancy`);
- continuous: a freed slot takes the next waiting prompt at once (what megatron-core's dynamic
  engine does; docs/architecture.md) — the batch stays full until the queue drains.

`--engine` runs the real rollout engine instead (the CPU quickstart's model by default, greedy,
each response cut at its drawn length through `generate(..., response_caps=)`), interleaved:
today's chunked engine (`ppo.generation_micro_batch` = `--slots` prompts per `generate` call)
against continuous batching (`generate(..., slots=)`, generation/continuous.py), reporting
tokens/s (wall and process CPU), rows computed, slot occupancy and whether the tokens agree.

    python benchmarks/decode_slots.py [--prompts 128] [--slots 32] [--limit 64]
    python benchmarks/decode_slots.py --engine [--preset quickstart] [--prompt-len 40] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

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
    p.add_argument("--engine", action="store_true", help="run the real rollout engine (see above)")
    p.add_argument("--preset", default="quickstart", help="--engine: ppo_step.py's presets")
    p.add_argument("--prompt-len", type=int, default=40, help="--engine: longest prompt (lengths vary ±25 %%)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from ppo_step import synthetic_response_lengths

    if args.engine:
        print(json.dumps(run_engines(args, synthetic_response_lengths(args.prompts, args.limit, args.seed)),
                         indent=2))
        return

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


def run_engines(args, lengths: list[int]) -> dict:
    """Today's chunked engine vs continuous batching on the real model, interleaved; medians."""
    import torch

    from megatron_reft.distributed.init import initialize
    from megatron_reft.engine import Engine
    from megatron_reft.generation import SamplingParams, generate

    import generation as genbench
    from ppo_step import model_config

    torch.set_num_threads(1)
    initialize(1, 1, seed=args.seed)
    model = model_config(args.preset)
    engine = Engine(model, dtype=torch.float32)
    genbench.fast_init(engine.gpt, model.init_std, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    prompt_lens = torch.randint(max(1, 3 * args.prompt_len // 4), args.prompt_len + 1, (args.prompts,), generator=g)
    prompts = [torch.randint(3, model.vocab_size, (int(n),), generator=g).tolist() for n in prompt_lens]
    params = SamplingParams(max_new_tokens=args.limit, greedy=True, ignore_eos=True,
                            max_total_length=args.prompt_len + args.limit + 1)

    def chunked():
        outs = [generate(engine, prompts[i:i + args.slots], 0, params, response_caps=lengths[i:i + args.slots])
                for i in range(0, len(prompts), args.slots)]
        return ([t for o in outs for t in o.tokens], sum(o.num_generated_tokens for o in outs),
                sum(o.decode_row_steps for o in outs), sum(o.decode_slot_steps for o in outs))

    def continuous():
        o = generate(engine, prompts, 0, params, slots=args.slots, response_caps=lengths)
        return o.tokens, o.num_generated_tokens, o.decode_row_steps, o.decode_slot_steps

    runs = {"today_chunked": chunked, "continuous": continuous}
    for fn in runs.values():  # warm-up
        fn()
    timings = {name: [] for name in runs}
    tokens = {}
    for _ in range(args.repeats):  # interleaved A B A B
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            tokens[name], generated, rows, slot_steps = fn()
            timings[name].append((time.perf_counter() - t0, time.process_time() - c0))
    result = {"preset": args.preset, "prompts": args.prompts, "slots": args.slots, "tokens": generated,
              "mean_response_length": sum(lengths) / len(lengths), "repeats": args.repeats,
              "load_average": os.getloadavg()}
    for name, fn in runs.items():
        _, generated, rows, slot_steps = fn()
        wall = statistics.median(t for t, _ in timings[name])
        cpu = statistics.median(c for _, c in timings[name])
        result[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                        "tokens_per_s": round(generated / wall, 1), "tokens_per_cpu_s": round(generated / cpu, 1),
                        "rows_computed": rows, "useful_share_of_computed_rows": round(generated / rows, 3),
                        "slot_occupancy": round(generated / slot_steps, 3)}
    ratios = [a[1] / b[1] for a, b in zip(timings["today_chunked"], timings["continuous"])]
    result["continuous_speedup_cpu"] = round(statistics.median(ratios), 3)
    result["continuous_speedup_wall"] = round(statistics.median(
        a[0] / b[0] for a, b in zip(timings["today_chunked"], timings["continuous"])), 3)
    result["greedy_tokens_equal"] = tokens["today_chunked"] == tokens["continuous"]
    return result


if __name__ == "__main__":
    main()

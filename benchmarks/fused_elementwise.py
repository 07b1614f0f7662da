"""SwiGLU and RoPE, forward + backward: megatron-core's unfused local ops against
models/fused_elementwise.py (one autograd node each), at a training micro-batch's shapes — and,
with --update, one whole PPO update of benchmarks/ppo_step.py's engine with the nodes on and off.

    python benchmarks/fused_elementwise.py [--preset quickstart|cpu-small] [--rows 45 --seq 90] [--repeats 7]
    python benchmarks/fused_elementwise.py --update [--preset quickstart|cpu-small] [--repeats 15]

Prints JSON: ms per call (forward + backward) for each op, medians of interleaved repeats of 20
calls, and megatron ÷ ours as the median of per-repeat ratios (min–max); with --update, seconds
per update (the rollout batch of ppo_step.py's shape, its token-budget micro-batches), the same
engine alternating between the two paths. Both compute the same bits
(tests/test_fused_elementwise.py checks it). 1 thread, fp32 unless --dtype bf16.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # (hidden, ffn, heads, groups, head_dim): the quickstart's model and `cpu-small`
    "quickstart": (128, 384, 4, 2, 32),
    "cpu-small": (256, 688, 8, 4, 32),
}


def megatron_swiglu(x):
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * (up + 0.0)


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


PPO_SHAPES = {  # benchmarks/ppo_step.py's $Q and $S (docs/benchmarks.md)
    "quickstart": "--preset quickstart --lengths synthetic --prompt-lengths synthetic --batch 128 --prompt-len 46 "
                  "--new-tokens 59 --micro-batch 64 --micro-batch-tokens 4096",
    "cpu-small": "--preset cpu-small --lengths synthetic --prompt-lengths synthetic --batch 32 --prompt-len 32 "
                 "--new-tokens 64 --micro-batch 8",
}


def update_ab(preset: str, repeats: int) -> dict:
    """One PPO update (ppo_step.py's rollout batch and plan) with the fused nodes on and off,
    interleaved on one engine: off = each layer's `_plain_swiglu` / `_plain_rope` answering
    False, which sends it down megatron's own path."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ppo_step as bench

    args = bench.parse_args((PPO_SHAPES[preset] + " --methods ours").split())
    model, engines, _ = bench.build(args)
    policy, reference = engines["ours"]
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, model.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    scores = (torch.rand(args.batch, generator=g) > 0.5).float()
    prompt_lengths, lengths = bench.drawn_lengths(args, args.seed)
    prompts = [p[:n] for p, n in zip(prompts, prompt_lengths)]
    seen = []
    train_step = policy.train_step

    def recorded(mbs, loss_fn):  # the step's own update inputs: micro-batches and the PPO loss
        seen.append((mbs, loss_fn))
        return train_step(mbs, loss_fn)

    policy.train_step = recorded
    bench.ours_step(policy, reference, prompts, lengths, scores, args, -1)  # a rollout batch to update on
    policy.train_step = train_step
    mbs, loss_fn = seen[0]

    def fused(on: bool):
        for layer in policy.gpt.decoder.layers:
            for module, name in ((layer.mlp, "_plain_swiglu"), (layer.self_attention, "_plain_rope")):
                module.__dict__.pop(name, None) if on else setattr(module, name, lambda: False)

    def timed_update(on: bool) -> float:
        fused(on)
        start = time.perf_counter()
        policy.train_step(mbs, loss_fn)
        return time.perf_counter() - start

    timed_update(True), timed_update(False)  # warm-up
    times = {True: [], False: []}
    for _ in range(repeats):
        for on in (True, False):
            times[on].append(timed_update(on))
    fused(True)
    ratios = [off / on for on, off in zip(times[True], times[False])]
    return {"preset": preset, "repeats": repeats, "threads": torch.get_num_threads(),
            "update_fused_s": round(statistics.median(times[True]), 4),
            "update_megatron_s": round(statistics.median(times[False]), 4),
            "megatron_over_ours": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3)}


def main(argv=None):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_reft.models.fused_elementwise import rope_cos_sin, rotate_query_key, swiglu

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(SHAPES), default="quickstart")
    p.add_argument("--rows", type=int, default=45, help="sequences in the micro-batch")
    p.add_argument("--seq", type=int, default=90, help="their (trimmed) length")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--update", action="store_true", help="time whole PPO updates instead of the ops")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.update:
        print(json.dumps(update_ab(args.preset, args.repeats), indent=1))
        return
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    _, ffn, heads, groups, dim = SHAPES[args.preset]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.seq, args.rows, 2 * ffn, generator=g).to(dtype).requires_grad_()
    grad_x = torch.randn(args.seq, args.rows, ffn, generator=g).to(dtype)
    q = torch.randn(args.seq, args.rows, heads, dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(args.seq, args.rows, groups, dim, generator=g).to(dtype).requires_grad_()
    grad_q, grad_k = torch.randn_like(q), torch.randn_like(k)
    half = torch.randn(args.seq, 1, 1, dim // 2, generator=g)
    angles = torch.cat((half, half), dim=-1)

    def rope_megatron():  # as Attention.forward calls it: query, then key, each from the angles
        out = [_apply_rotary_pos_emb_bshd(t, angles) for t in (q, k)]
        torch.autograd.backward(out, [grad_q, grad_k])

    def rope_ours():  # (cos, sin) once per layer for query and key, as the attention forms them
        torch.autograd.backward(list(rotate_query_key(q, k, *rope_cos_sin(angles, 1.0, dtype))), [grad_q, grad_k])

    cases = {"swiglu": (lambda: megatron_swiglu(x).backward(grad_x), lambda: swiglu(x).backward(grad_x)),
             "rope": (rope_megatron, rope_ours)}
    result = {"preset": args.preset, "rows": args.rows, "seq": args.seq, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "calls": args.calls}
    for name, (theirs, ours) in cases.items():
        for fn in (theirs, ours):  # warm-up
            timed(fn, 3)
        times = {"megatron": [], "ours": []}
        for _ in range(args.repeats):  # interleaved
            times["megatron"].append(timed(theirs, args.calls))
            times["ours"].append(timed(ours, args.calls))
        ratios = [a / b for a, b in zip(times["megatron"], times["ours"])]
        result[name] = {"megatron_ms": round(statistics.median(times["megatron"]), 3),
                        "ours_ms": round(statistics.median(times["ours"]), 3),
                        "megatron_over_ours": round(statistics.median(ratios), 2),
                        "min": round(min(ratios), 2), "max": round(max(ratios), 2)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""The output layer on CPU: megatron's kernels against ours, one process. Prints one JSON object.

    python benchmarks/output_projection.py                       # cpu-small, SmolLM2, a 2048-wide model
    python benchmarks/output_projection.py --shapes 32016x256 --repeats 9

Per vocabulary × hidden and row count, interleaved repeats (A B A B …) of:

- `forward`: logits for `rows` hidden states without autograd (a decode step at 1–128 rows, a
  log-prob pass's chunk at 512): megatron's `ColumnParallelLinear` (torch.matmul, MKL's
  sgemm on CPU) against `output_projection.vocab_logits` (oneDNN's inner product from
  `cpu_matmul.ONEDNN_MIN_MACS` multiply-adds up);
- `update`: an update's output layer and label log-probs, forward and backward, for `rows`
  scored positions: megatron's layer and `vocab_parallel_cross_entropy` (after masking the
  padded vocabulary in place, as the engine did) against `vocab_logits` and
  `vocab_parallel._LabelLogProbs`.

Times are medians in ms per call; ratios (megatron ÷ ours: > 1 means ours is faster) are medians
of per-repeat ratios with min–max (shared/reference/measuring.md). `max_abs_diff` compares the
two methods' outputs (logits, or log-probs and the hidden-state gradient).
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
    p.add_argument("--shapes", default="32016x256,49152x576,32000x2048",
                   help="comma-separated vocabulary x hidden (cpu-small, SmolLM2-135M, a 1B-class llama)")
    p.add_argument("--forward-rows", default="1,8,32,128,512")
    p.add_argument("--update-rows", default="128,512")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def make_layer(vocab: int, hidden: int):
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4, use_cpu_initialization=True)
    return ColumnParallelLinear(hidden, vocab, config=config, init_method=lambda w: torch.nn.init.normal_(w, std=0.02),
                                bias=False, gather_output=False)


def forward_methods(layer):
    from megatron_reft.models.output_projection import vocab_logits

    return {"megatron": lambda h: layer(h)[0], "ours": lambda h: vocab_logits(layer, h, None)}


def update_methods(layer, true_vocab: int):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_reft.models.output_projection import vocab_logits
    from megatron_reft.models.vocab_parallel import mask_padding, vocab_parallel_logprobs

    def megatron(h, labels):
        logits = mask_padding(layer(h)[0].float(), true_vocab)
        return -vocab_parallel_cross_entropy(logits, labels)

    def ours(h, labels):
        return vocab_parallel_logprobs(vocab_logits(layer, h, None).float(), labels, true_vocab)

    return {"megatron": megatron, "ours": ours}


def run_update(fn, hidden, labels):
    h = hidden.detach().requires_grad_(True)
    logprobs = fn(h, labels)
    logprobs.sum().backward()
    return logprobs.detach(), h.grad


def interleaved(methods: dict, call, repeats: int) -> dict:
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            call(fn)
            times[name].append((time.perf_counter() - start) * 1e3)
    ratios = [a / b for a, b in zip(times["megatron"], times["ours"])]
    return {"ms": {name: round(statistics.median(t), 3) for name, t in times.items()},
            "ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3)}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.models.cpu_matmul import ONEDNN_MIN_MACS, onednn_available

    initialize(1, 1, seed=0)
    result = {"threads": args.threads, "onednn_available": onednn_available(),
              "onednn_min_macs": ONEDNN_MIN_MACS, "forward": [], "update": []}
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        vocab, hidden = (int(x) for x in shape.split("x"))
        layer = make_layer(vocab, hidden)
        with torch.no_grad():
            methods = forward_methods(layer)
            for rows in (int(r) for r in args.forward_rows.split(",")):
                h = torch.randn(rows, 1, hidden, generator=g)
                row = {"vocab": vocab, "hidden": hidden, "rows": rows,
                       "max_abs_diff": (methods["megatron"](h) - methods["ours"](h)).abs().max().item()}
                row.update(interleaved(methods, lambda fn: fn(h), args.repeats))
                result["forward"].append(row)
        methods = update_methods(layer, vocab - 7)  # a padded vocabulary's tail, as TP padding leaves it
        for rows in (int(r) for r in args.update_rows.split(",")):
            h = torch.randn(rows, 1, hidden, generator=g)
            labels = torch.randint(0, vocab - 7, (rows, 1), generator=g)
            (lp_a, grad_a), (lp_b, grad_b) = (run_update(methods[m], h, labels) for m in ("megatron", "ours"))
            row = {"vocab": vocab, "hidden": hidden, "rows": rows,
                   "max_abs_diff": max((lp_a - lp_b).abs().max().item(), (grad_a - grad_b).abs().max().item())}
            row.update(interleaved(methods, lambda fn: run_update(fn, h, labels), args.repeats))
            result["update"].append(row)
        layer.weight.grad = None
    shutdown()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""A linear layer's three products on CPU: torch's default (MKL's sgemm) against oneDNN's fp32
inner product (models/cpu_matmul.py), at the quickstart's and `cpu-small`'s linear shapes.

    python benchmarks/cpu_matmul.py [--rows 1,8,32,128,4096] [--repeats 7]

For each (rows, in → out): forward x·Wᵀ, input gradient g·W, weight gradient gᵀ·x, each timed
both ways in interleaved repeats; prints JSON with GFLOP/s (medians) and MKL ÷ oneDNN time (the
median of per-repeat ratios, min–max: > 1 means oneDNN is faster), whether `cpu_matmul` takes
oneDNN for the shape, and the largest difference between the two results relative to the
largest entry. 1 thread, fp32. The rows a model meets: a decode step's batch (1–128) and a
training micro-batch's tokens (~4k).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (in, out) of every linear: quickstart (hidden 128, ffn 384, vocab 384; QKV 128 → 256) and
# cpu-small (hidden 256, ffn 688, vocab 32,016; QKV 256 → 512)
SHAPES = [(128, 256), (128, 128), (128, 768), (384, 128), (128, 384),
          (256, 512), (256, 256), (256, 1376), (688, 256), (256, 32016)]


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main(argv=None):
    from megatron_reft.models import cpu_matmul

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,32,128,4096")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--max-macs", type=float, default=2e9, help="skip bigger products (time)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    onednn = cpu_matmul._onednn_linear
    result = {"threads": 1, "repeats": args.repeats, "onednn_available": cpu_matmul.onednn_available(),
              "onednn_min_macs": cpu_matmul.ONEDNN_MIN_MACS, "shapes": []}
    g = torch.Generator().manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        for d_in, d_out in SHAPES:
            macs = rows * d_in * d_out
            if macs > args.max_macs:
                continue
            x, w = torch.randn(rows, d_in, generator=g), torch.randn(d_out, d_in, generator=g)
            grad = torch.randn(rows, d_out, generator=g)
            products = {"forward": (lambda: x @ w.t(), lambda: onednn(x, w)),
                        "input_grad": (lambda: grad @ w, lambda: onednn(grad, w.t())),
                        "weight_grad": (lambda: grad.t() @ x, lambda: cpu_matmul._weight_grad(grad, x))}
            calls = max(1, int(2e7 // macs))  # ~a few ms per timing
            row = {"rows": rows, "in": d_in, "out": d_out, "takes_onednn": cpu_matmul.takes_onednn(rows, w)}
            for name, (mkl, dnn) in products.items():
                diff = ((mkl() - dnn()).abs().max() / mkl().abs().max()).item()
                timed(mkl, 2), timed(dnn, 2)
                t_mkl, t_dnn = [], []
                for _ in range(args.repeats):
                    t_mkl.append(timed(mkl, calls))
                    t_dnn.append(timed(dnn, calls))
                ratios = [a / b for a, b in zip(t_mkl, t_dnn)]
                row[name] = {"mkl_gflops": round(2 * macs / statistics.median(t_mkl) / 1e9, 1),
                             "onednn_gflops": round(2 * macs / statistics.median(t_dnn) / 1e9, 1),
                             "mkl_over_onednn": round(statistics.median(ratios), 2),
                             "min": round(min(ratios), 2), "max": round(max(ratios), 2), "rel_diff": diff}
            result["shapes"].append(row)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

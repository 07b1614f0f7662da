"""Host work per decode step: our engine vs Hugging Face `generate` on a model so narrow that
every kernel takes microseconds, as a kernel launch does on a GPU. What is left is each
method's per-layer host work, the cost that made the H200's decode host-bound
(docs/benchmarks.md, "First GPU run"). Same weights, T=1 sampling, fixed lengths, one thread,
interleaved repeats; prints one JSON object.

    python benchmarks/decode_overhead.py                     # 16 layers of width 64, batch 8
    python benchmarks/decode_overhead.py --profile           # + the top of a cProfile of ours
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generation as genbench  # noqa: E402  (the HF weight copy)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    from megatron_reft.distributed import init as dinit
    from megatron_reft.engine import Engine
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.models.families import ModelConfig

    dinit.initialize(1, 1, seed=0)
    model = ModelConfig(family="llama", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                        num_query_groups=2, ffn_hidden_size=2 * args.hidden, vocab_size=512,
                        max_position_embeddings=1024, preset="tiny-llama")
    engine = Engine(model, dtype=torch.float32)
    genbench.fast_init(engine.gpt, 0.02, 0)
    device = dinit.device()
    hf = genbench.hf_copy(engine, device, torch.float32)
    prompts = torch.randint(1, 512, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True,
                            max_total_length=args.prompt_len + args.new_tokens + 1)
    ids = torch.tensor(prompts, device=device)

    def ours(seed):
        return generate(engine, prompts, 0, params, seed=seed)

    def hugging_face(seed):
        torch.manual_seed(seed)
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                           temperature=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           eos_token_id=0, pad_token_id=0)

    runs = {"ours": ours, "hf": hugging_face}
    for fn in runs.values():
        fn(-1)  # warm-up
    seconds = {name: [] for name in runs}
    for r in range(args.repeats):
        for name, fn in runs.items():
            genbench.synchronize()
            t0 = time.perf_counter()
            fn(r)
            genbench.synchronize()
            seconds[name].append(time.perf_counter() - t0)
    ratios = [h / o for o, h in zip(seconds["ours"], seconds["hf"])]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": str(device), "layers": args.layers,
              "hidden": args.hidden, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats,
              "ms_per_step": {n: round(statistics.median(s) / args.new_tokens * 1e3, 3) for n, s in seconds.items()},
              "hf_over_ours": {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                               "max": round(max(ratios), 3)}}
    print(json.dumps(result, indent=1))
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.runcall(ours, 7)
        pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    dinit.shutdown()


if __name__ == "__main__":
    main()

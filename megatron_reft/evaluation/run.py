"""Greedy accuracy (reft.md §5: "greedy decoding on the test set").

`megatron-reft eval --config FILE --ckpt DIR [--out FILE.jsonl] [key=value ...]` loads a
checkpoint at the config's TP × PP (any layout it was saved with), decodes every item of
data.eval_file greedily, scores it and writes per-item predictions.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_reft import runtime


def response_text(tokenizer, record, response_tokens: list[int], cot_type: str,
                  prompt_tokens: list[int]) -> str:
    """What the scorer reads: the text the response adds after the prompt it was generated
    from (EOS dropped), exactly as decoding prompt + response shows it (the reference's way;
    decoding the response alone drops a Llama tokenizer's first space); for P-CoT the whole
    program, i.e. the pre-filled header plus the body the policy wrote (reft.md §2)."""
    from megatron_reft.data import full_program

    ids = [t for t in response_tokens if t != tokenizer.eos_id]
    text = tokenizer.decode_continuation(prompt_tokens, ids)
    return full_program(tokenizer, record, text) if cot_type == "pcot" else text


def make_scorer(config):
    from megatron_reft.reward import RewardConfig, RewardScorer

    r = config.reward
    return RewardScorer(RewardConfig(cot_type=config.data.cot_type, partial_reward=r.partial_reward,
                                     tolerance=r.tolerance, strict_numbers=r.strict_numbers,
                                     mcq_partial_reward=r.mcq_partial_reward, timeout_s=r.timeout_s,
                                     num_workers=r.num_workers))


def _all_gather(items: list) -> list:
    if not dist.is_initialized():
        return items
    from megatron.core import parallel_state as ps

    gathered = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(gathered, items, group=ps.get_data_parallel_group(with_context_parallel=False))
    return [x for part in gathered for x in part]


@torch.no_grad()
def greedy_accuracy(engine, tokenizer, records: list, config, scorer, batch_size: int = 32):
    """(accuracy over all DP ranks, per-item predictions) — every rank gets the same numbers."""
    from megatron_reft.data import encode_rl_prompts, eval_shard
    from megatron_reft.generation import SamplingParams, generate

    d = config.data
    dp_rank, dp_size = runtime.dp_rank_and_size()
    mine = [records[i] for i in eval_shard(len(records), dp_rank, dp_size)]
    prompts, kept, _ = encode_rl_prompts(tokenizer, mine, d.cot_type, d.max_prompt_length, "report",
                                         overlong=d.overlong_prompts)
    predictions = []
    for start in range(0, len(prompts), batch_size):
        chunk, recs = prompts[start:start + batch_size], kept[start:start + batch_size]
        params = SamplingParams(max_new_tokens=d.max_total_length - min(len(p) for p in chunk),
                                greedy=True, max_total_length=d.max_total_length)
        out = generate(engine, chunk, tokenizer.eos_id, params, static_decode=config.model.cuda_graph_decode)
        texts = [response_text(tokenizer, r, toks, d.cot_type, p) for r, toks, p in zip(recs, out.tokens, chunk)]
        results = scorer.score(texts, [r.answer for r in recs], [r.answer_type for r in recs])
        predictions += [{"id": r.id, "response": t, "extracted": s.extracted, "status": s.status,
                         "correct": bool(s.correct), "reward": s.reward, "answer": r.answer}
                        for r, t, s in zip(recs, texts, results)]
    everything = _all_gather(predictions)
    skipped = len(records) - len(everything)  # over-long prompts count as wrong, never vanish
    accuracy = sum(p["correct"] for p in everything) / max(len(everything) + skipped, 1)
    return accuracy, everything


def run(config, ckpt: str, out_path: str | None, samples: int | None = None, temperature: float = 1.0,
        samples_dir: str | None = None, reranker: str | None = None) -> float:
    from megatron_reft.checkpoint.io import load_checkpoint
    from megatron_reft.engines import build_engine

    runtime.start(config)
    data = runtime.load_data(config, need_train=False)
    if not data.eval:
        raise runtime.ConfigError("data.eval_file: evaluation needs a test file")
    model_cfg = runtime.model_config_for(config, data)
    out = Path(out_path or Path(config.trainer.output_dir) / "predictions.jsonl")
    if samples:  # k samples per question (docs/evaluation.md), checked before anything is written
        from megatron_reft.evaluation.sampled import SampleStore, check_store_settings, evaluate_sampled

        samples_dir = samples_dir or str(out.with_suffix(".samples"))
        check_store_settings(SampleStore(samples_dir), {"samples": samples, "temperature": temperature,
                                                        "checkpoint": str(ckpt)})
    rm_engine = None
    if reranker:  # refused before anything is written if it has no classification head
        from megatron_reft.evaluation.reward_model import load_reranker

        rm_engine = load_reranker(config, model_cfg, reranker)
    engine = build_engine(config, model_cfg, optim=False)
    load_checkpoint(ckpt, engine.module)
    sampled = {}
    with make_scorer(config) as scorer:
        accuracy, predictions = greedy_accuracy(engine, data.tokenizer, data.eval, config, scorer)
        if samples:
            sampled = evaluate_sampled(engine, data, config, scorer, samples, temperature, samples_dir, rm_engine)
    if runtime.rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(p) + "\n" for p in predictions))
        print(json.dumps({"checkpoint": str(ckpt), "n": len(predictions), "accuracy": accuracy,
                          "predictions": str(out), **sampled}))
    return accuracy


@runtime.exit_on_config_error
def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--ckpt", required=True, help="checkpoint directory (any TP x PP)")
        parser.add_argument("--out", help="per-item predictions (default: <output_dir>/predictions.jsonl)")
        parser.add_argument("--samples", type=int, metavar="K",
                            help="also sample K responses per question: maj_at_k, pass_at_k (docs/evaluation.md)")
        parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --samples")
        parser.add_argument("--samples-dir", help="per-question samples, resumable "
                                                  "(default: the --out path with suffix .samples)")
        parser.add_argument("--reranker", metavar="CKPT", help="with --samples: reward-model checkpoint "
                                                               "(megatron-reft train-rm) for rerank_at_k")

    args = runtime.parse_job_args(argv, "eval", "Greedy accuracy of a checkpoint on data.eval_file.", extra)
    overrides = list(args.overrides)
    config = runtime.load_and_validate(args.config, overrides + [f"model.load={args.ckpt}"], job="eval")
    _check_sampling_args(args)
    run(config, args.ckpt, args.out, args.samples, args.temperature, args.samples_dir, args.reranker)
    from megatron_reft.distributed.init import shutdown

    shutdown()
    return 0


def _check_sampling_args(args) -> None:
    if args.samples is not None and args.samples < 1:
        raise runtime.ConfigError(f"--samples: must be >= 1, got {args.samples}")
    if args.reranker and not args.samples:
        raise runtime.ConfigError("--reranker: needs --samples K (it reranks the K samples)")
    if args.reranker and not (Path(args.reranker) / "weights").is_dir():
        raise runtime.ConfigError(f"--reranker: not a checkpoint directory: {args.reranker}")
    if not args.temperature >= 0:
        raise runtime.ConfigError(f"--temperature: must be >= 0, got {args.temperature}")

"""Offline self-training data (reft.md §6): sample k CoTs per TRAIN question from the warm-up
model at T = 1, keep up to 10 unique correct ones plus the gold CoT, and write a training file
for an SFT from the base model.

    megatron-reft offline-st-data --config RECIPE --ckpt WARMUP --samples 100 --out st_train.jsonl
    megatron-reft sft --config RECIPE data.train_file=st_train.jsonl model.load=BASE ...

Sampling is evaluation/sampled.py's: data-parallel, batched, resumable (rerun the same command
after an interruption), with a progress bar. The store is `<out>.samples/`.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_reft import runtime


def build_records(train: list, stored: dict, cot_type: str, max_samples: int) -> list:
    """Every train record (gold first) followed by its kept samples, in train order; a question
    without stored samples (prompt too long) keeps its gold record only."""
    from megatron_reft.rl.self_training import offline_self_training_records

    out = []
    for record in train:
        samples = stored.get(str(record.id), {}).get("samples", [])
        out += offline_self_training_records(record, samples, cot_type, max_samples)
    return out


def run(config, ckpt: str, out_path: str, k: int, temperature: float, max_samples: int) -> dict:
    from megatron_reft.checkpoint.io import load_checkpoint
    from megatron_reft.data.loaders import save_records
    from megatron_reft.evaluation.run import make_scorer
    from megatron_reft.evaluation.sampled import SampleStore, check_store_settings, sample_questions
    from megatron_reft.engines import build_engine

    runtime.start(config)
    data = runtime.load_data(config, need_train=True)
    if not data.train:
        raise runtime.ConfigError("data.train_file: offline self-training samples the training questions")
    store = SampleStore(Path(str(out_path) + ".samples"))
    check_store_settings(store, {"samples": k, "temperature": temperature, "checkpoint": str(ckpt)})
    engine = build_engine(config, runtime.model_config_for(config, data), optim=False)
    load_checkpoint(ckpt, engine.module)
    with make_scorer(config) as scorer:
        sampled_now = sample_questions(engine, data.tokenizer, data.train, config, scorer, k, temperature, store,
                                       batch_sequences=config.ppo.generation_micro_batch or 64,
                                       progress=config.trainer.progress_bar)
    summary = {}
    if runtime.rank() == 0:
        records = build_records(data.train, store.load(), config.data.cot_type, max_samples)
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        save_records(records, str(out_path))
        summary = {"questions": len(data.train), "records": len(records),
                   "samples_kept": len(records) - len(data.train), "sampled_now_rank0": sampled_now,
                   "out": str(out_path), "samples_dir": str(store.root)}
        print(json.dumps(summary))
    runtime.barrier()
    return summary


@runtime.exit_on_config_error
def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--ckpt", required=True, help="the warm-up checkpoint to sample from")
        parser.add_argument("--out", required=True, help="training file to write (JSONL records)")
        parser.add_argument("--samples", type=int, default=100, metavar="K", help="samples per question (100)")
        parser.add_argument("--temperature", type=float, default=1.0)
        parser.add_argument("--max-kept", type=int, default=10, help="unique correct samples kept per question (10)")

    args = runtime.parse_job_args(argv, "offline-st-data",
                                  "Offline self-training data: k samples per train question, kept if correct.", extra)
    for name, value, low in (("--samples", args.samples, 1), ("--max-kept", args.max_kept, 0),
                             ("--temperature", args.temperature, 0)):
        if not value >= low:
            raise runtime.ConfigError(f"{name}: must be >= {low}, got {value}")
    config = runtime.load_and_validate(args.config, list(args.overrides) + [f"model.load={args.ckpt}"], job="eval")
    run(config, args.ckpt, args.out, args.samples, args.temperature, args.max_kept)
    from megatron_reft.distributed.init import shutdown

    shutdown()
    return 0

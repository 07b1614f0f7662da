"""Train the reranking reward model (reft.md §6): a correct/incorrect classifier initialised from
the SFT or ReFT checkpoint (`model.load`), trained on warm-up samples of the train set.

    megatron-reft offline-st-data --config RECIPE --ckpt WARMUP --out runs/st/train.jsonl   # the samples
    megatron-reft train-rm --config RECIPE --samples-dir runs/st/train.jsonl.samples \\
        model.load=WARMUP optim.lr=1e-6 trainer.epochs=3 data.max_total_length=700 trainer.output_dir=runs/rm
    megatron-reft eval --config RECIPE --ckpt REFT --samples 100 --reranker runs/rm/checkpoints/step_N

Every stored sample of a train question is one example (label: its `correct`); sequences longer
than `data.max_total_length` are left out (counted in the start-up line). Batching, lr schedule,
checkpoints and resume follow SFT's keys (trainer.global_batch_size, micro_batch_size, epochs,
optim.*); the model is evaluation/reward_model.py's.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_reft import runtime


def build_examples(tokenizer, train: list, stored: dict, max_length: int) -> tuple[list, int]:
    """(prompt ids, response ids + EOS, label) for every stored sample of a train question, in
    train order; and how many were too long."""
    from megatron_reft.evaluation.reward_model import encode_pair

    examples, too_long = [], 0
    for record in train:
        for sample in stored.get(str(record.id), {}).get("samples", []):
            prompt, response = encode_pair(tokenizer, record.question, sample["response"])
            if len(prompt) + len(response) > max_length:
                too_long += 1
                continue
            examples.append((prompt, response, float(bool(sample["correct"]))))
    return examples, too_long


def _reduce(stats: list[dict]) -> tuple[float, float]:
    """(mean CE per example, accuracy) over micro-batches and DP ranks (last stage, TP rank 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    totals = torch.zeros(3, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        for s in stats:
            totals += torch.tensor([float(s["rm_loss_sum"]), float(s["rm_hits"]), float(s["rm_rows"])],
                                   dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    rows = float(totals[2].clamp(min=1))
    return float(totals[0]) / rows, float(totals[1]) / rows


def run(config, samples_dir: str) -> dict:
    from megatron_reft.checkpoint.io import load_checkpoint, prune_checkpoints, save_checkpoint
    from megatron_reft.data import ResumableBatchSampler
    from megatron_reft.evaluation.reward_model import classifier_batch, rm_loss_fn
    from megatron_reft.evaluation.sampled import SampleStore
    from megatron_reft.rl.rollout import micro_batches
    from megatron_reft.engines import build_engine

    runtime.start(config)
    data = runtime.load_data(config)
    model_cfg = runtime.model_config_for(config, data)
    examples, too_long = build_examples(data.tokenizer, data.train, SampleStore(samples_dir).load(),
                                        config.data.max_total_length)
    if len(examples) < config.trainer.global_batch_size:
        raise runtime.ConfigError(f"--samples-dir: {len(examples)} usable samples of data.train_file's questions in "
                                  f"{samples_dir} ({too_long} longer than data.max_total_length), fewer than "
                                  f"trainer.global_batch_size={config.trainer.global_batch_size}")
    positives = sum(e[2] for e in examples)
    runtime.print0(f"reward model: {len(examples)} samples ({positives:.0f} correct), {too_long} too long")
    runtime.write_run_config(config)
    t, o = config.trainer, config.optim
    dp_rank, dp_size = runtime.dp_rank_and_size()
    sampler = ResumableBatchSampler(len(examples), t.global_batch_size, dp_rank, dp_size, seed=t.seed)
    max_steps = t.max_steps if t.max_steps is not None else t.epochs * sampler.batches_per_epoch
    engine = build_engine(config, model_cfg, value_head=True)
    step = 0
    resume = runtime.resume_source(config)
    if resume is not None:
        state = load_checkpoint(resume, engine.module, optimizer=engine.optimizer, load_rng=True)
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
    else:  # the SFT/ReFT trunk; the head stays random unless the checkpoint has one
        load_checkpoint(config.model.load, engine.module)
        engine._sync_param_copies()
    ckpt_dir, logger = Path(t.output_dir) / "checkpoints", runtime.MetricsLogger(config, max_steps, step, "rm")
    metrics = {}
    while step < max_steps:
        t0 = time.perf_counter()
        rows = [examples[i] for i in sampler.next_batch()]
        batch = classifier_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                 data.tokenizer.pad_id)
        lr = runtime.learning_rate(step, max_steps, o.lr, o.schedule, o.warmup_fraction, o.min_lr)
        engine.set_lr(lr)
        engine.module.train()
        result = engine.train_step(micro_batches(batch, list(range(batch.size)), t.micro_batch_size), rm_loss_fn)
        step += 1
        loss, accuracy = _reduce(result["stats"])
        metrics = {"step": step, "epoch": step / sampler.batches_per_epoch, "loss": loss,
                   "train_accuracy": accuracy, "lr": lr, "grad_norm": result["grad_norm"],
                   "step_time": time.perf_counter() - t0}
        logger.log(metrics)
        if step % sampler.batches_per_epoch == 0 or step == max_steps:
            save_checkpoint(ckpt_dir / f"step_{step}", engine.module, model_cfg, optimizer=engine.optimizer,
                            trainer_state={"step": step, "sampler": sampler.state_dict(), "metrics": metrics,
                                           "job": "rm"},
                            tokenizer=data.tokenizer, carry_from=config.model.load)
            prune_checkpoints(ckpt_dir, t.keep_last)
    logger.close()
    return metrics


@runtime.exit_on_config_error
def main(argv=None) -> int:
    def extra(parser):
        parser.add_argument("--samples-dir", required=True,
                            help="sample store of train questions (offline-st-data's <out>.samples)")

    args = runtime.parse_job_args(argv, "train-rm", "Reward model for reranking (reft.md §6).", extra)
    if not Path(args.samples_dir).is_dir():
        raise runtime.ConfigError(f"--samples-dir: not a directory: {args.samples_dir}")
    config = runtime.load_and_validate(args.config, args.overrides, job="sft", run_kind="rm")
    if config.model.load is None:
        raise runtime.ConfigError("model.load: the reward model is initialised from the SFT or ReFT checkpoint")
    run(config, args.samples_dir)
    from megatron_reft.distributed.init import shutdown

    shutdown()
    return 0

"""Warm-up SFT (reft.md §1): cross-entropy on CoT target tokens + EOS, prompt masked.

`megatron-reft sft --config FILE [key=value ...]`; runs under torchrun, srun or plain python.
Resumes automatically from the latest checkpoint in trainer.output_dir (what a requeued
Slurm job needs), bit-identically on CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_reft import runtime
from megatron_reft.checkpoint.io import load_checkpoint, prune_checkpoints, save_checkpoint
from megatron_reft.engine import Engine
from megatron_reft.engines import build_engine
from megatron_reft.reliability import watchdog
from megatron_reft.reliability.numerics import NonFiniteGuard
from megatron_reft.evaluation.run import greedy_accuracy, make_scorer


def sft_loss(mb: dict, out: dict):
    """Sum of target-token NLL and the token count; megatron divides by the global count."""
    mask = mb["loss_mask"].float()
    nll_sum = -(out["logprobs"] * mask).sum()
    count = mask.sum()
    return nll_sum, count, {"nll_sum": nll_sum.detach(), "tokens": count.detach()}


def microbatches(examples: list, micro_batch_size: int, pad_id: int, token_budget: int | None = None) -> list[dict]:
    """Length-sorted micro-batches, each padded only to its own longest example (the loss is a
    per-token sum, so grouping changes nothing but the padding); `token_budget`: see
    data/batching.py's plan_micro_batches."""
    from megatron_reft.data import collate_sft, plan_micro_batches
    from megatron_reft.rl.rollout import pipeline_width_multiple

    multiple = pipeline_width_multiple()
    groups = plan_micro_batches([len(e.input_ids) - 1 for e in examples], micro_batch_size, token_budget, multiple)
    return [collate_sft([examples[i] for i in g], pad_id, multiple) for g in groups]


def global_mean(stats: list[dict], key: str = "nll_sum", count_key: str = "tokens") -> float:
    """Mean over all DP ranks of a summed statistic; only last-stage ranks hold stats, and TP
    duplicates scale numerator and denominator alike."""
    import torch.distributed as dist

    totals = torch.zeros(2, dtype=torch.float64)
    for s in stats:
        totals += torch.tensor([float(s[key]), float(s[count_key])], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp(min=1))


@torch.no_grad()
def evaluation_loss(engine: Engine, examples: list, micro_batch_size: int, pad_id: int) -> float:
    from megatron_reft.data import eval_shard

    dp_rank, dp_size = runtime.dp_rank_and_size()
    mine = [examples[i] for i in eval_shard(len(examples), dp_rank, dp_size)]
    stats = []
    if mine:
        batches = microbatches(mine, micro_batch_size, pad_id)
        for mb in batches:  # one call per micro-batch: sizes may differ at the end
            out = engine.forward([mb])[0]
            mask = mb["loss_mask"].float().to(out["logprobs"].device)
            stats.append({"nll_sum": -(out["logprobs"][:, :mask.shape[1]] * mask).sum(), "tokens": mask.sum()})
    from megatron.core import parallel_state as ps

    if not ps.is_pipeline_last_stage() or ps.get_tensor_model_parallel_rank() != 0:
        stats = []  # count each DP replica's numbers once
    return global_mean(stats)


def run(config) -> dict:
    from megatron_reft.data import ResumableBatchSampler, encode_sft_records

    launch = runtime.start(config, job="sft")
    runtime.print0(runtime.layout_line(config) + f" (launcher: {launch.launcher})")
    data = runtime.load_data(config)
    model_cfg = runtime.model_config_for(config, data)
    runtime.write_run_config(config, model_cfg, job="sft")
    d, t = config.data, config.trainer
    examples, _, _ = encode_sft_records(data.tokenizer, data.train, d.cot_type, d.max_length, d.on_malformed)
    eval_examples = []
    if data.eval and all(r.cot for r in data.eval):
        eval_examples, _, _ = encode_sft_records(data.tokenizer, data.eval, d.cot_type, d.max_length, "report")
    dp_rank, dp_size = runtime.dp_rank_and_size()
    sampler = ResumableBatchSampler(len(examples), t.global_batch_size, dp_rank, dp_size, seed=t.seed)
    steps_per_epoch = sampler.batches_per_epoch
    max_steps = t.max_steps if t.max_steps is not None else t.epochs * steps_per_epoch
    schedule_steps = (config.optim.planned_epochs or t.epochs) * steps_per_epoch

    engine = build_engine(config, model_cfg)
    step, best = 0, None
    resume = runtime.resume_source(config)
    if resume is not None:
        state = load_checkpoint(resume, engine.module, optimizer=engine.optimizer, load_rng=True)
        step, best = state["step"], state.get("best_accuracy")
        sampler.load_state_dict(state["sampler"])
        runtime.print0(f"resumed from {resume} at step {step}")
    elif config.model.load:
        load_checkpoint(config.model.load, engine.module)
        engine._sync_param_copies()
    else:
        engine.init_from_scratch(t.seed)

    ckpt_dir = Path(t.output_dir) / "checkpoints"
    # MFU counts 6·N FLOPs per trained token (forward + backward)
    logger = runtime.MetricsLogger(config, max_steps, step, "sft",
                                   train_flops_per_token=6 * model_cfg.num_parameters())
    guard = NonFiniteGuard(t.max_nonfinite_steps, ckpt_dir)
    pad_id = data.tokenizer.pad_id

    kept_epochs = tuple(f"step_{e * steps_per_epoch}" for e in t.keep_epochs)  # e.g. the warm-up's epoch 2
    scorer = make_scorer(config) if t.eval_accuracy and data.eval else None

    def save(name: str, metrics: dict) -> None:
        trainer_state = {"step": step, "sampler": sampler.state_dict(), "metrics": metrics,
                         "best_accuracy": best, "job": "sft", "model": config.model.preset}
        is_best = name == "best"  # for evaluation or as a warm-up, not to resume from: no optimizer
        save_checkpoint(ckpt_dir / name, engine.module, model_cfg, trainer_state=trainer_state,
                        optimizer=None if is_best else engine.optimizer, update_latest=not is_best,
                        tokenizer=data.tokenizer, carry_from=config.model.load)
        prune_checkpoints(ckpt_dir, t.keep_last, protect=("best",) + kept_epochs)

    last_saved, metrics = step, {}
    started = time.perf_counter()
    while step < max_steps and not runtime.out_of_time(started, t.max_seconds):
        timer, t0 = runtime.Timer(), time.perf_counter()
        with timer("data"):
            batch = [examples[i] for i in sampler.next_batch()]
            mbs = microbatches(batch, t.micro_batch_size, pad_id, t.micro_batch_tokens)
        lr = runtime.learning_rate(step, schedule_steps, config.optim.lr, config.optim.schedule,
                                   config.optim.warmup_fraction, config.optim.min_lr)
        engine.set_lr(lr)
        engine.module.train()
        with timer("train"), watchdog.phase("update"):  # forward + backward + optimizer step
            result = engine.train_step(mbs, sft_loss)
        step += 1
        seconds = time.perf_counter() - t0
        tokens = sum(len(e.input_ids) for e in batch) * dp_size
        metrics = {"step": step, "epoch": step / steps_per_epoch, "loss": global_mean(result["stats"]),
                   "lr": lr, "grad_norm": result["grad_norm"], "tokens_per_s": tokens / seconds,
                   "step_time": seconds, **guard.observe(result["update_ok"])}
        epoch_end = step % steps_per_epoch == 0
        eval_due = t.eval_interval and step % t.eval_interval == 0
        if epoch_end or eval_due or step == max_steps:
            with timer("eval"), watchdog.phase("eval"):
                if eval_examples:
                    metrics["eval_loss"] = evaluation_loss(engine, eval_examples, t.micro_batch_size, pad_id)
                if scorer is not None:  # reft.md §6 "SFT, best epoch": greedy accuracy (docs/evaluation.md)
                    metrics["eval_accuracy"], _ = greedy_accuracy(engine, data.tokenizer, data.eval, config, scorer)
        metrics.update(timer.as_metrics())
        logger.log(metrics)
        guard.stop_if_exhausted(step)
        new_best = metrics.get("eval_accuracy") is not None and (best is None or metrics["eval_accuracy"] > best)
        if new_best:  # before the step checkpoint, so a resume from it knows this best
            best = metrics["eval_accuracy"]
        save_due = step % t.save_interval == 0 if t.save_interval else epoch_end
        if save_due or step == max_steps or f"step_{step}" in kept_epochs:
            save(f"step_{step}", metrics)
            last_saved = step
        if new_best:
            save("best", metrics)
    if last_saved != step:
        save(f"step_{step}", metrics)
    logger.close(final_checkpoint=ckpt_dir / f"step_{step}")
    if scorer is not None:
        scorer.close()
    return metrics


@runtime.exit_on_config_error
def main(argv=None) -> int:
    args = runtime.parse_job_args(argv, "sft", "Warm-up supervised fine-tuning (reft.md §1).")
    config = runtime.load_and_validate(args.config, args.overrides, job="sft")
    run(config)
    from megatron_reft.distributed.init import shutdown

    shutdown()
    return 0

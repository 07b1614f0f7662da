"""ReFT PPO (reft.md §4), one rollout batch per step:

    generate (policy, T=1) → score (answer / program in the sandbox) → old log-probs + values
    (policy) and ref log-probs (frozen warm-up model) → k1-KL rewards → GAE (γ=1, λ=0.95) →
    whitening over all DP ranks → 2 PPO updates (policy + 5 × value) → metrics, eval, checkpoint

`megatron-reft ppo --config FILE [key=value ...]`. model.load names the warm-up checkpoint: the
policy starts from it (value head random) and the reference model is a frozen copy of it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_reft import runtime
from megatron_reft.checkpoint.io import load_checkpoint, mark_latest, prune_checkpoints, save_checkpoint
from megatron_reft.config import ConfigError, auto_true_false
from megatron_reft.engines import build_critic, build_engine
from megatron_reft.evaluation.run import greedy_accuracy, make_scorer, response_text
from megatron_reft.generation.stages import masks_while_decoding
from megatron_reft.reliability import watchdog
from megatron_reft.reliability.numerics import NonFiniteGuard, rollout_is_finite
from megatron_reft.rl import ppo_math
from megatron_reft.rl.rollout import (assemble, build_rollout_batch, gather_forward, micro_batches, padding_stats,
                                      rollout_outputs)


def ppo_loss_fn(config, with_value: bool = True):
    """total = policy + vf_coef · value (reft.md §4); the value term only for a shared trunk."""
    p = config.ppo

    def loss_fn(mb: dict, out: dict):
        mask = mb["action_mask"]
        # num_sequences=1: the sum of per-sequence means; megatron divides by the number of
        # sequences over all micro-batches and DP ranks (engine.py's loss convention).
        if with_value:
            loss, stats = ppo_math.ppo_loss(
                out["logprobs"], mb["old_logprobs"], out["values"], mb["values"], mb["advantages"],
                mb["returns"], mask, clip_eps=p.clip_eps, value_clip_range=p.value_clip,
                vf_coef=p.vf_coef, num_sequences=1, entropy=out["entropy"])
        else:
            loss, stats = ppo_math.policy_loss(out["logprobs"], mb["old_logprobs"], mb["advantages"],
                                               mask, clip_eps=p.clip_eps, num_sequences=1)
            stats = {"policy_loss": loss.detach(), **stats}  # the value loss: the critic's statistics
        num_sequences = ppo_math.count_sequences(mask)
        # Report losses per sequence (the optimised loss is their sum; see above).
        stats = {k: (v / num_sequences.clamp(min=1) if k in ("policy_loss", "value_loss") else v)
                 for k, v in stats.items()}
        return loss, num_sequences, stats

    return loss_fn


def reduce_stats(stats: list[dict]) -> dict:
    """Average micro-batch statistics over micro-batches and all DP ranks (max for *_max)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_reft.distributed.roles import role_group

    group = role_group()  # the actor's ranks when a separate critic holds the others (issue 12)
    keys = sorted(stats[0]) if stats else []
    keys = _broadcast_keys(keys)
    contributes = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
    maxes = torch.full((len(keys),), -float("inf"), dtype=torch.float64)
    if contributes:
        for s in stats:
            sums[:-1] += torch.tensor([float(s[k]) for k in keys], dtype=torch.float64)
            maxes = torch.maximum(maxes, torch.tensor([float(s[k]) for k in keys], dtype=torch.float64))
        sums[-1] = len(stats)
    if dist.is_initialized():
        dist.all_reduce(sums, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
    return {k: float(maxes[i]) if k.endswith("_max") else float(sums[i] / sums[-1].clamp(min=1))
            for i, k in enumerate(keys)}


def _broadcast_keys(keys: list[str]) -> list[str]:
    """Only last-stage ranks know the stat names; share them with everyone."""
    import torch.distributed as dist

    from megatron_reft.distributed.roles import role_group

    if not dist.is_initialized():
        return keys
    gathered = [None] * dist.get_world_size(role_group())
    dist.all_gather_object(gathered, keys, group=role_group())
    return max(gathered, key=len)


class PPOTrainer:
    def __init__(self, config, launch=None):
        self.config = config
        self.launch = launch if launch is not None else runtime.start(config, job="ppo")
        runtime.print0(runtime.layout_line(config) + f" (launcher: {self.launch.launcher})")
        self.data = runtime.load_data(config)
        self.model_cfg = runtime.model_config_for(config, self.data)
        runtime.write_run_config(config, self.model_cfg, job="ppo")
        shared = config.critic.mode == "shared"
        self.policy = build_engine(config, self.model_cfg, optim=True, value_head=shared)
        check_rollout_engine(config, self.policy)
        self.reference = build_engine(config, self.model_cfg, optim=False)
        self.critic = build_critic(config, self.model_cfg, self.policy)  # critic.mode (issue 12)
        self.scorer = make_scorer(config)
        self._prepare_prompts()
        self.step, self.best_accuracy = 0, None
        self._load_weights()

    def _prepare_prompts(self) -> None:
        from megatron_reft.data import LoadReport, ResumableBatchSampler, encode_rl_prompts

        d, t = self.config.data, self.config.trainer
        self.prompts, self.records, report = encode_rl_prompts(
            self.data.tokenizer, self.data.train, d.cot_type, d.max_prompt_length, d.on_malformed,
            LoadReport(source="train prompts", fmt=f"max_prompt_length {d.max_prompt_length}, "
                                                   f"overlong_prompts={d.overlong_prompts}"),
            overlong=d.overlong_prompts)
        runtime.print0(f"train prompts: {report}")
        dp_rank, dp_size = runtime.dp_rank_and_size()
        self.sampler = ResumableBatchSampler(len(self.prompts), self.config.ppo.rollout_batch_size,
                                             dp_rank, dp_size, seed=t.seed)
        per_epoch = self.sampler.batches_per_epoch
        self.max_steps = t.max_steps if t.max_steps is not None else t.epochs * per_epoch

    def _load_weights(self) -> None:
        c = self.config
        if c.model.load is None:
            runtime.print0("warning: model.load is not set; PPO starts from random weights")
            self.policy.init_from_scratch(c.trainer.seed)
            self.reference.init_from_scratch(c.trainer.seed)
        else:
            load_checkpoint(c.model.load, self.reference.module)
            load_checkpoint(c.model.load, self.policy.module)  # value head stays random (§4)
            self.policy.reset_value_head(c.trainer.seed)
        resume = runtime.resume_source(c)
        if resume is not None:
            if self._separate_critic() is not None:  # critic/ in the same checkpoint
                self.critic.load(_critic_dir_of(resume))
            state = load_checkpoint(resume, self.policy.module, optimizer=self.policy.optimizer, load_rng=True)
            self.step, self.best_accuracy = state["step"], state.get("best_accuracy")
            self.sampler.load_state_dict(state["sampler"])
            runtime.print0(f"resumed from {resume} at step {self.step}")
        else:  # weights written in place: refresh the optimizer's fp32 main copies from them. Not
            # on resume: the checkpoint's main copies are exact, the bf16 weights only their rounding
            self.policy._sync_param_copies()
        if c.ppo.ref_offload:
            self.reference.offload()

    # ------------------------------------------------------------------ one step
    def rollout(self, timer) -> tuple:
        from megatron_reft.generation import SamplingParams, generate

        p, d = self.config.ppo, self.config.data
        dp_rank, _ = runtime.dp_rank_and_size()
        rows = self.sampler.next_batch()
        prompts = [self.prompts[i] for i in rows]
        records = [self.records[i] for i in rows]
        params = SamplingParams(max_new_tokens=d.max_total_length - min(len(x) for x in prompts),
                                temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                max_total_length=d.max_total_length)
        # A seed per (run, step, DP rank): rollouts are reproducible and resume exactly.
        seed = self.config.trainer.seed * 1_000_003 + self.step * 101 + dp_rank
        # ppo.generation_micro_batch bounds the KV cache (prompts decoded together).
        chunk = p.generation_micro_batch or len(prompts)
        eos = self.data.tokenizer.eos_id
        scored = p.old_logprobs_from_rollout and self.critic is not None  # online-ST reads no log-probs
        align = auto_true_false(p.align_prompts)
        with timer("generation"):
            self.policy.module.eval()
            if p.continuous_batching and chunk < len(prompts):  # one queue through `chunk` slots
                outs = [generate(self.policy, prompts, eos, params, seed=seed, slots=chunk, return_logprobs=scored,
                                 align_prompts=align, static_decode=self.config.model.cuda_graph_decode)]
            else:
                outs = [generate(self.policy, prompts[start:start + chunk], eos, params, seed=seed + 7919 * start,
                                 return_logprobs=scored, align_prompts=align,
                                 static_decode=self.config.model.cuda_graph_decode)
                        for start in range(0, len(prompts), chunk)]
        responses = [toks for out in outs for toks in out.tokens]
        finished = [done for out in outs for done in out.finished]
        # share of the decode rows computed that produced a response token (the rest fed prompt
        # tokens or idled until compaction / admission): GenerationOutput.decode_utilisation
        row_steps = sum(out.decode_row_steps for out in outs)
        self.decode_utilisation = sum(out.num_generated_tokens for out in outs) / row_steps if row_steps else 0.0
        texts = [response_text(self.data.tokenizer, r, toks, d.cot_type, prompt)
                 for r, toks, prompt in zip(records, responses, prompts)]
        scores_future = self.scorer.score_async(texts, [r.answer for r in records],
                                                [r.answer_type for r in records])
        self.last_rollout = (records, texts)  # for the rollout samples (tracking.py)
        batch = build_rollout_batch(prompts, responses, finished, self.data.tokenizer.pad_id,
                                    _rollout_scores(outs) if scored else None)
        return batch, scores_future

    def _policy_outputs(self, batch, mbs) -> list[dict]:
        """Old log-probs, entropy and (shared trunk) values per micro-batch: the rollout's own
        scores when it kept them (ppo.old_logprobs_from_rollout: the same weights, eval mode,
        same hidden states — one forward of the whole batch less), else a policy forward."""
        if not batch.rollout_outputs:
            return self.policy.forward(mbs)
        if self.critic.shared and "values" not in batch.rollout_outputs:
            raise RuntimeError("old_logprobs_from_rollout: the rollout returned no values from the policy's value head")
        return rollout_outputs(batch, mbs, device=next(self.policy.gpt.parameters()).device)

    def score_and_advantages(self, batch, scores_future, timer) -> dict:
        from megatron.core import parallel_state as ps

        p, t = self.config.ppo, self.config.trainer
        rows = list(range(batch.size))
        with timer("logprobs"):  # overlaps with sandbox scoring running in the background
            mbs = micro_batches(batch, rows, t.micro_batch_size, t.micro_batch_tokens)
            pending_values = self.critic.request_values(mbs)  # a separate critic starts now
            old = self._policy_outputs(batch, mbs)
            if p.ref_offload:
                self.reference.onload()
            ref = self.reference.forward(mbs, with_entropy=False)  # same plan; entropy unused
            if p.ref_offload:
                self.reference.offload()
        with timer("critic_values_wait"):  # GAE needs the values: the only wait
            old_values = pending_values.result(old)
        with timer("scoring"):
            results = scores_future.result()
        scores = torch.tensor([r.reward for r in results], dtype=torch.float32)
        mask = batch.action_mask
        old_logprobs = gather_forward(old, "logprobs", mbs, batch)
        values = assemble(old_values, mbs, batch.size, batch.tokens.shape[1], device=batch.tokens.device)
        ref_logprobs = gather_forward(ref, "logprobs", mbs, batch)
        rewards, kl = ppo_math.kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, p.kl_coef)
        advantages, returns = ppo_math.gae_advantages(rewards, values, mask, p.gamma, p.lam)
        advantages = ppo_math.whiten_advantages(advantages, mask, group=ps.get_data_parallel_group())
        batch.tensors.update(old_logprobs=old_logprobs, values=values, advantages=advantages, returns=returns)
        entropy = gather_forward(old, "entropy", mbs, batch)
        return {"scores": scores, "correct": torch.tensor([float(r.correct) for r in results]),
                "kl": kl, "entropy": entropy, "values": values, "returns": returns,
                "statuses": [r.status for r in results], "results": results}

    def update(self, batch, timer) -> dict:
        p, t = self.config.ppo, self.config.trainer
        _, dp_size = runtime.dp_rank_and_size()
        mini = (p.mini_batch_size or p.rollout_batch_size) // dp_size
        stats, grad_norms, padding, all_ok = [], [], [], True
        if not rollout_is_finite(batch.tensors, batch.action_mask):  # NaN rewards/values/advantages
            return {"grad_norm": float("nan"), "update_ok": False}
        with timer("update"):
            self.policy.set_lr(self.config.optim.lr)  # reft.md §5: constant
            for _ in range(p.ppo_epochs):  # full batch each, no reshuffle needed (§5)
                for start in range(0, batch.size, mini):
                    rows = list(range(start, min(start + mini, batch.size)))
                    mbs = micro_batches(batch, rows, t.micro_batch_size, t.micro_batch_tokens)
                    padding.append(padding_stats(batch, mbs))
                    self.critic.update(mbs)  # a separate critic trains while the policy does
                    result = self.policy.train_step(mbs, ppo_loss_fn(self.config, self.critic.shared))
                    stats += result["stats"]
                    grad_norms.append(result["grad_norm"])
                    all_ok = all_ok and result["update_ok"]
        reduced = reduce_stats(stats)
        reduced["grad_norm"] = sum(grad_norms) / len(grad_norms)
        reduced["update_ok"] = all_ok
        for key in padding[0]:  # this rank's update passes (ranks see alike length mixes)
            reduced[key] = sum(pad[key] for pad in padding) / len(padding)
        with timer("critic_update_wait"):
            reduced.update(self.critic.update_stats())  # value loss, critic timers and overlap
        return reduced

    def step_metrics(self, batch, adv: dict, update: dict, timer, seconds: float) -> dict:
        mask = batch.action_mask
        local = torch.tensor([adv["scores"].sum(), adv["correct"].sum(), batch.size,
                              float(sum(batch.response_lengths)),
                              ppo_math.masked_sum(adv["kl"], mask), ppo_math.masked_sum(adv["entropy"], mask),
                              mask.sum()], dtype=torch.float64)
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if dist.is_initialized():
            dist.all_reduce(local, group=ps.get_data_parallel_group())
        score_sum, correct, n, resp_tokens, kl_sum, ent_sum, actions = local.tolist()
        ev = ppo_math.explained_variance(adv["values"], adv["returns"], mask)
        generated = resp_tokens
        metrics = {"step": self.step, "epoch": self.step / self.sampler.batches_per_epoch,
                   "reward_mean": score_sum / n, "accuracy": correct / n,
                   "kl": kl_sum / n, "kl_per_token": kl_sum / max(actions, 1),
                   "entropy": ent_sum / max(actions, 1), "response_length": resp_tokens / n,
                   "value_loss": update.get("value_loss"), "policy_loss": update.get("policy_loss"),
                   "explained_variance": float(ev), "clip_fraction": update.get("clip_fraction"),
                   "value_clip_fraction": update.get("value_clip_fraction"),
                   "ratio_mean": update.get("ratio_mean"), "ratio_max": update.get("ratio_max"),
                   "approx_kl": update.get("approx_kl"), "grad_norm": update["grad_norm"],
                   "lr": self.config.optim.lr, "step_time": seconds,
                   "tokens_per_s": generated / seconds if seconds else 0.0}
        metrics.update({k: v for k, v in update.items() if k.startswith("padding_fraction")})
        metrics["decode_utilisation"] = self.decode_utilisation  # this rank's rollout
        # a separate critic's phase timers, its wait and overlap figures (issue 12)
        metrics.update({k: v for k, v in update.items() if k.startswith("critic_")})
        metrics.update(timer.as_metrics())
        return metrics

    def rollout_samples(self, results) -> list[dict]:
        """The first trainer.num_samples rollouts of this step (this rank's share of the batch)."""
        records, texts = self.last_rollout
        n = self.config.trainer.num_samples
        return [{"prompt": r.question, "response": text, "reward": res.reward, "extracted": res.extracted,
                 "gold": r.answer, "status": res.status}
                for r, text, res in list(zip(records, texts, results))[:n]]

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> float | None:
        if not self.data.eval:
            return None
        self.policy.module.eval()
        watchdog.enter("eval")
        accuracy, _ = greedy_accuracy(self.policy, self.data.tokenizer, self.data.eval, self.config, self.scorer)
        return accuracy

    def save(self, name: str, metrics: dict, update_latest: bool = True) -> None:
        ckpt_dir = Path(self.config.trainer.output_dir) / "checkpoints"
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "metrics": metrics,
                 "best_accuracy": self.best_accuracy, "job": "ppo", "reference": self.config.model.load}
        separate = self._separate_critic()
        save_checkpoint(ckpt_dir / name, self.policy.module, self.model_cfg, optimizer=self.policy.optimizer,
                        trainer_state=state, tokenizer=self.data.tokenizer,
                        update_latest=update_latest and separate is None, carry_from=self.config.model.load)
        if separate is not None:  # a separate critic (here or on its own ranks): same step, then `latest`
            separate.save(ckpt_dir / name / "critic", self.model_cfg, tokenizer=self.data.tokenizer,
                          carry_from=self.config.critic.load or self.config.model.load)
            if update_latest and runtime.rank() == 0:
                mark_latest(ckpt_dir / name)
        prune_checkpoints(ckpt_dir, self.config.trainer.keep_last)

    def _separate_critic(self):
        """The critic when it has a model of its own to save and resume (critic.mode=separate)."""
        return self.critic if self.critic is not None and not self.critic.shared else None

    def train(self) -> dict:
        t = self.config.trainer
        logger = runtime.MetricsLogger(self.config, self.max_steps, self.step, "ppo")
        eval_every = t.eval_interval or self.sampler.batches_per_epoch
        save_every = t.save_interval or self.sampler.batches_per_epoch
        metrics, last_saved = {}, self.step
        guard = NonFiniteGuard(t.max_nonfinite_steps, Path(t.output_dir) / "checkpoints")
        started = time.perf_counter()
        # trainer.max_seconds: stop early with a checkpoint (the Slurm scripts use it before the
        # job's time limit, so a requeued job loses nothing).
        while self.step < self.max_steps and not runtime.out_of_time(started, t.max_seconds):
            timer, t0 = runtime.Timer(), time.perf_counter()
            batch, scores_future = self.rollout(timer)
            adv = self.score_and_advantages(batch, scores_future, timer)
            update = self.update(batch, timer)
            self.step += 1
            metrics = self.step_metrics(batch, adv, update, timer, time.perf_counter() - t0)
            metrics.update(guard.observe(update["update_ok"]))
            if t.sample_interval and self.step % t.sample_interval == 0:
                logger.log_samples(self.step, self.rollout_samples(adv["results"]))
            if self.step % eval_every == 0 or self.step == self.max_steps:
                metrics["eval_accuracy"] = self.evaluate()
                if metrics["eval_accuracy"] is not None and (self.best_accuracy is None
                                                             or metrics["eval_accuracy"] > self.best_accuracy):
                    self.best_accuracy = metrics["eval_accuracy"]
                    self.save("best", metrics, update_latest=False)
            logger.log(metrics)
            guard.stop_if_exhausted(self.step)
            if self.step % save_every == 0 or self.step == self.max_steps:
                self.save(f"step_{self.step}", metrics)
                last_saved = self.step
        if last_saved != self.step:
            self.save(f"step_{self.step}", metrics)
        logger.close(final_checkpoint=Path(t.output_dir) / "checkpoints" / f"step_{self.step}")
        self.scorer.close()
        if self.critic is not None:  # (online-st has none)
            self.critic.close()  # a critic on its own ranks stops serving
        return metrics


def check_rollout_engine(config, policy) -> None:
    """Settings the policy's layer spec cannot run, refused before any step."""
    if config.ppo.continuous_batching and not masks_while_decoding(policy.gpt):
        raise ConfigError("ppo.continuous_batching: needs an attention that applies a padding mask while "
                          "decoding, which Transformer Engine's does not: set model.use_te=false (the local "
                          "layer spec) or ppo.continuous_batching=false")


def _rollout_scores(outs: list) -> dict:
    """The generation outputs' per-token scores, concatenated over the generate calls, under the
    names of Engine.forward's outputs (values only when the policy has a value head)."""
    names = {"logprobs": "logprobs", "entropy": "entropies"}
    if outs[0].values is not None:
        names["values"] = "values"
    return {name: [row for out in outs for row in getattr(out, field)] for name, field in names.items()}


def _critic_dir_of(checkpoint) -> Path:
    critic = Path(checkpoint) / "critic"
    if not (critic / "model.yaml").is_file():
        raise ConfigError(f"critic.mode: separate, but {checkpoint} has no critic/ checkpoint (it was "
                          "written with critic.mode=shared); resume with critic.mode=shared")
    return critic


@runtime.exit_on_config_error
def main(argv=None) -> int:
    args = runtime.parse_job_args(argv, "ppo", "ReFT PPO from a warm-up checkpoint (reft.md §4).")
    config = runtime.load_and_validate(args.config, args.overrides, job="ppo")
    from megatron_reft.distributed.roles import current_role

    launch = runtime.start(config, job="ppo")  # a split world when the critic has its own ranks
    role = current_role()
    if role is not None and role.name == "critic":
        from megatron_reft.critic_server import run_critic_role

        run_critic_role(config)
    else:
        PPOTrainer(config, launch).train()
    from megatron_reft.distributed.init import shutdown

    shutdown()
    return 0

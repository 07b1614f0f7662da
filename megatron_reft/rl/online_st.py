"""Online self-training (reft.md §6), the baseline ReFT is compared with:

    generate (policy, T=1) → score → update on 0.5·CE(correct samples) + 0.5·CE(gold CoTs)

ReFT's loop (rl/trainer.py: same sampler, rollout, scorer, evaluation, checkpoints, resume) with
the update replaced: no reference model, no KL, no value head, no advantages. `ppo.ppo_epochs`
passes over the rollout batch in mini-batches of `ppo.mini_batch_size`, as the reference
(`train_rl_sl.py`). The loss is `rl/self_training.py:online_self_training_loss`.

`megatron-reft online-st --config FILE model.load=WARMUP [key=value ...]`; the ppo section's
kl_coef, gamma, lam, clip and value settings are unused.
"""
from __future__ import annotations

import torch

from megatron_reft import runtime
from megatron_reft.checkpoint.io import load_checkpoint
from megatron_reft.evaluation.run import make_scorer
from megatron_reft.rl.rollout import build_rollout_batch, micro_batches
from megatron_reft.rl.self_training import correct_sample_mask, online_self_training_loss
from megatron_reft.rl.trainer import PPOTrainer, check_rollout_engine, reduce_stats
from megatron_reft.engines import build_engine


class _RememberingSampler:
    """The PPO sampler, remembering the rows of the last batch (their gold CoTs are trained too)."""

    def __init__(self, sampler):
        self._sampler, self.last_rows = sampler, []

    def next_batch(self):
        self.last_rows = list(self._sampler.next_batch())
        return self.last_rows

    def __getattr__(self, name):
        return getattr(self._sampler, name)


def gold_split(example) -> tuple[list[int], list[int]]:
    """An SFT example as (prompt, target + EOS): the target is where SFT's loss mask is 1."""
    start = example.loss_mask.index(1)
    return example.input_ids[:start], example.input_ids[start:]


def online_st_loss_fn(num_sample_tokens: torch.Tensor, num_gold_tokens: torch.Tensor, scale: int):
    """Engine loss for one micro-batch of the combined (samples + gold) batch. The token counts
    are the mini-batch's over all DP ranks, so the micro-batch losses sum to the mini-batch loss;
    megatron divides that sum by the summed count (1 per micro-batch = `scale` in all), hence
    the multiplication by `scale`."""
    def loss_fn(mb: dict, out: dict):
        gold = mb["is_gold"].bool()
        sample_mask = correct_sample_mask(mb["scores"], mb["action_mask"]) * (~gold)[:, None]
        gold_mask = mb["action_mask"] * gold[:, None]
        loss, stats = online_self_training_loss(out["logprobs"], sample_mask, out["logprobs"], gold_mask,
                                                num_sample_tokens=num_sample_tokens,
                                                num_gold_tokens=num_gold_tokens)
        # stats × scale: their mean over micro-batches and ranks is then the mini-batch CE
        return loss * scale, 1, {k: v * scale for k, v in stats.items() if k != "correct_samples"}
    return loss_fn


def online_st_train_step(engine, combined, sample_rows: list[int], micro_batch_size: int,
                         micro_batch_tokens: int | None = None) -> dict:
    """One optimizer step on this rank's share of a mini-batch: `sample_rows` of the combined
    batch (samples in rows [0, B), their gold CoTs at [B, 2B)) and the matching gold rows."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    n = combined.size // 2
    rows = list(sample_rows) + [n + r for r in sample_rows]
    mask = combined.action_mask[rows]
    gold = combined.tensors["is_gold"][rows].bool()
    correct = correct_sample_mask(combined.tensors["scores"][rows], mask)
    mbs = micro_batches(combined, rows, micro_batch_size, micro_batch_tokens)
    # correct-sample tokens, gold tokens, micro-batches: over the whole mini-batch (all DP ranks)
    counts = torch.stack([correct[~gold].sum(), mask[gold].sum(), torch.tensor(len(mbs))]).double()
    if dist.is_initialized():
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
    loss_fn = online_st_loss_fn(counts[0].float(), counts[1].float(), int(counts[2]))
    return engine.train_step(mbs, loss_fn)


class OnlineSTTrainer(PPOTrainer):
    def __init__(self, config):  # PPOTrainer's set-up without the reference model and value head
        self.config = config
        self.launch = runtime.start(config, job="ppo")  # run lock, leftovers, watchdog (as PPO)
        runtime.print0(runtime.layout_line(config) + f" (launcher: {self.launch.launcher}) [online self-training]")
        self.data = runtime.load_data(config)
        self.model_cfg = runtime.model_config_for(config, self.data)
        runtime.write_run_config(config, self.model_cfg, job="ppo")
        self.policy = build_engine(config, self.model_cfg, optim=True, value_head=False)
        check_rollout_engine(config, self.policy)
        self.critic = None  # reft.md §6: no value head
        self.scorer = make_scorer(config)
        self._prepare_prompts()
        self.sampler = _RememberingSampler(self.sampler)
        self._prepare_gold()
        self.step, self.best_accuracy = 0, None
        self._load_weights()

    def _prepare_gold(self) -> None:
        from megatron_reft.data.prompts import OverlongError, encode_sft

        d = self.config.data
        self.gold = []
        for record in self.records:  # aligned with self.prompts; None: no gold CoT to train on
            try:
                self.gold.append(gold_split(encode_sft(self.data.tokenizer, record, d.cot_type, d.max_length))
                                 if record.cot else None)
            except OverlongError:
                self.gold.append(None)

    def _load_weights(self) -> None:
        c = self.config
        if c.model.load is None:
            runtime.print0("warning: model.load is not set; online self-training starts from random weights")
            self.policy.init_from_scratch(c.trainer.seed)
        else:
            load_checkpoint(c.model.load, self.policy.module)
        resume = runtime.resume_source(c)
        if resume is not None:
            state = load_checkpoint(resume, self.policy.module, optimizer=self.policy.optimizer, load_rng=True)
            self.step, self.best_accuracy = state["step"], state.get("best_accuracy")
            self.sampler.load_state_dict(state["sampler"])
            runtime.print0(f"resumed from {resume} at step {self.step}")
        else:  # weights written in place: refresh the optimizer's fp32 main copies from them. Not
            # on resume: the checkpoint's main copies are exact, the bf16 weights only their rounding
            self.policy._sync_param_copies()

    def score_and_advantages(self, batch, scores_future, timer) -> dict:
        """Scores only, and the combined batch: rows [0, B) the samples, [B, 2B) their gold CoTs."""
        with timer("scoring"):
            results = scores_future.result()
        scores = torch.tensor([r.reward for r in results], dtype=torch.float32)
        rows = self.sampler.last_rows
        gold = [self.gold[i] or ([self.prompts[i][0]], []) for i in rows]  # no gold: an empty target
        prompts = [self.prompts[i] for i in rows] + [g[0] for g in gold]
        # the sampled response tokens are labels[P-1 : P-1+R] (rl/rollout.py's layout)
        responses = [batch.labels[r, batch.prompt_lengths[r] - 1:batch.prompt_lengths[r] - 1 + n].tolist()
                     for r, n in enumerate(batch.response_lengths)] + [g[1] for g in gold]
        combined = build_rollout_batch(prompts, responses, batch.finished + [True] * len(gold),
                                       self.data.tokenizer.pad_id)
        n = batch.size
        combined.tensors.update(is_gold=torch.cat([torch.zeros(n), torch.ones(n)]),
                                scores=torch.cat([scores, torch.zeros(n)]))
        self._combined = combined  # PPOTrainer.train() calls update(batch, timer)
        return {"scores": scores, "correct": torch.tensor([float(r.correct) for r in results]),
                "statuses": [r.status for r in results], "results": results}  # results: trainer.sample_interval

    def update(self, batch, timer) -> dict:
        p, t = self.config.ppo, self.config.trainer
        combined, n = self._combined, batch.size
        _, dp_size = runtime.dp_rank_and_size()
        mini = (p.mini_batch_size or p.rollout_batch_size) // dp_size
        stats, grad_norms, all_ok = [], [], True
        with timer("update"):
            self.policy.set_lr(self.config.optim.lr)
            for _ in range(p.ppo_epochs):
                for start in range(0, n, mini):
                    sample_rows = list(range(start, min(start + mini, n)))
                    result = online_st_train_step(self.policy, combined, sample_rows, t.micro_batch_size,
                                                  t.micro_batch_tokens)
                    stats += result["stats"]
                    grad_norms.append(result["grad_norm"])
                    all_ok = all_ok and result["update_ok"]
        reduced = reduce_stats(stats)
        reduced["grad_norm"] = sum(grad_norms) / len(grad_norms)
        reduced["update_ok"] = all_ok  # the non-finite guard (docs/reliability.md)
        return reduced

    def step_metrics(self, batch, adv: dict, update: dict, timer, seconds: float) -> dict:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        local = torch.tensor([adv["scores"].sum(), adv["correct"].sum(), batch.size,
                              float(sum(batch.response_lengths))], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(local, group=ps.get_data_parallel_group())
        score_sum, correct, n, resp_tokens = local.tolist()
        metrics = {"step": self.step, "epoch": self.step / self.sampler.batches_per_epoch,
                   "sample_ce": update.get("sample_ce"), "gold_ce": update.get("gold_ce"),
                   "reward_mean": score_sum / n, "accuracy": correct / n, "response_length": resp_tokens / n,
                   "grad_norm": update["grad_norm"], "lr": self.config.optim.lr, "step_time": seconds,
                   "tokens_per_s": resp_tokens / seconds if seconds else 0.0}
        metrics.update(timer.as_metrics())
        return metrics


@runtime.exit_on_config_error
def main(argv=None) -> int:
    args = runtime.parse_job_args(argv, "online-st", "Online self-training baseline (reft.md §6).")
    config = runtime.load_and_validate(args.config, args.overrides, job="ppo")
    OnlineSTTrainer(config).train()
    from megatron_reft.distributed.init import shutdown

    shutdown()
    return 0

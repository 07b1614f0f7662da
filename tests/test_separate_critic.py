"""A separate critic on its own ranks (issue 12) computes and learns exactly what the same critic
does in one process.

4 processes: actor TP=2 on ranks 0-1, critic TP=1 × PP=2 on ranks 2-3, one world (gloo), each
role with its own megatron parallel groups. The same PPO step is run once in a single process
holding both models; values before the step, the actor's and the critic's weights after it
(probed through log-probs and values of the batch) and the statistics must agree.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

# (actor TP, critic PP): model parallelism on both sides; (1, 1): DP=2 on both sides (the rows
# are gathered from the actor's DP ranks and spread over the critic's).
SPLITS = {"actorTP2-criticPP2": (2, 2), "actorDP2-criticDP2": (1, 1)}
OVERRIDES = ["critic.mode=separate", "critic.lr=0.01", "optim.lr=0.01", "trainer.micro_batch_size=2"]


def _rollout(model_cfg):
    from megatron_reft.rl.rollout import build_rollout_batch

    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, model_cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 5, 4, 3)]
    responses = [torch.randint(3, model_cfg.vocab_size, (n,), generator=g).tolist() for n in (6, 2, 4, 5)]
    return build_rollout_batch(prompts, responses, [True, False, True, True], pad_id=0)


def _ppo_step(config, model_cfg, critic) -> dict:
    """One PPO step as the trainer does it: values (overlapping the actor's forward), GAE, one
    update of both models, then probes of the new weights."""
    from megatron_reft.engines import build_engine
    from megatron_reft.rl import ppo_math
    from megatron_reft.rl.rollout import assemble, gather_forward, micro_batches
    from megatron_reft.rl.trainer import ppo_loss_fn, reduce_stats
    from megatron.core import parallel_state as ps

    policy = build_engine(config, model_cfg, optim=True)
    policy.init_from_scratch(5)
    batch = _rollout(model_cfg)
    rows = list(range(batch.size))
    mbs = micro_batches(batch, rows, 2)
    pending = critic.request_values(mbs)
    old = policy.forward(mbs)
    width = batch.tokens.shape[1]  # micro-batches are length-sorted and trimmed: back to [B, S]
    values = assemble(pending.result(old), mbs, batch.size, width)
    old_logprobs = gather_forward(old, "logprobs", mbs, batch)
    noise = torch.randn(old_logprobs.shape, generator=torch.Generator().manual_seed(12))
    ref_logprobs = old_logprobs + 0.05 * noise
    rewards, _ = ppo_math.kl_penalized_rewards(torch.tensor([1.0, 0.1, 0.0, 1.0]), old_logprobs, ref_logprobs,
                                               batch.action_mask, 0.05)
    advantages, returns = ppo_math.gae_advantages(rewards, values, batch.action_mask)
    advantages = ppo_math.whiten_advantages(advantages, batch.action_mask)
    batch.tensors.update(old_logprobs=old_logprobs, values=values, advantages=advantages, returns=returns)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = rows[dp_rank * batch.size // dp:(dp_rank + 1) * batch.size // dp]  # this DP rank's share
    train_mbs = micro_batches(batch, mine, 2)
    critic.update(train_mbs)
    policy.module.train()
    result = policy.train_step(train_mbs, ppo_loss_fn(config, with_value=False))
    stats = {**reduce_stats(result["stats"]), **critic.update_stats()}
    probe = micro_batches(batch, rows, 2)
    mask = batch.action_mask
    return {"values_before": values * mask, "stats": stats,
            "logprobs_after": gather_forward(policy.forward(probe), "logprobs", probe, batch) * mask,
            "values_after": assemble(critic.values(probe), probe, batch.size, width) * mask}


def _split_worker(rank, world, actor_tp, critic_pp):
    torch.set_num_threads(1)
    from megatron_reft.config import load_config
    from megatron_reft.distributed import roles
    from megatron_reft.distributed.init import shutdown
    from megatron_reft.engines import build_critic
    from megatron_reft.models.families import model_config_from_preset

    role = roles.start_split_world(dict(critic_world_size=2, actor_tp=actor_tp, actor_pp=1, critic_tp=1,
                                        critic_pp=critic_pp), seed=3)
    config = load_config(None, OVERRIDES + ["trainer.seed=5", "critic.world_size=2",
                                            f"critic.pipeline_model_parallel_size={critic_pp}"])
    model_cfg = model_config_from_preset("tiny-llama", vocab_size=200)
    critic = build_critic(config, model_cfg)
    out = None
    if role.name == "actor":
        out = _ppo_step(config, model_cfg, critic)
        critic.close()
    else:
        critic.serve()
    roles.clear_role()
    shutdown()
    return out


def _single_worker(rank, world):
    torch.set_num_threads(1)
    from megatron_reft.config import load_config
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engines import build_critic
    from megatron_reft.models.families import model_config_from_preset

    initialize(1, 1, seed=3)
    config = load_config(None, OVERRIDES + ["trainer.seed=5"])
    model_cfg = model_config_from_preset("tiny-llama", vocab_size=200)
    out = _ppo_step(config, model_cfg, build_critic(config, model_cfg))  # a LocalCritic
    shutdown()
    return out


@pytest.fixture(scope="module")
def single_process_step():
    return run_distributed(_single_worker, 1, init_process_group=False, timeout_s=400)[0]


@pytest.mark.parametrize("layout", list(SPLITS))
def test_split_world_critic_matches_one_process(single_process_step, layout):
    single = single_process_step
    results = run_distributed(_split_worker, 4, *SPLITS[layout], init_process_group=False, timeout_s=600)
    assert results[2] is None and results[3] is None  # critic ranks only serve
    for got in results[:2]:  # both actor ranks hold the same answers
        for key in ("values_before", "logprobs_after", "values_after"):
            torch.testing.assert_close(got[key], single[key], atol=2e-5, rtol=1e-5, msg=key)
        assert set(got["stats"]) >= {"policy_loss", "value_loss", "critic_overlap", "critic_update_time"}
        assert 0.0 <= got["stats"]["critic_overlap"] <= 1.0 and got["stats"]["critic_wait"] >= 0.0
        for key in ("policy_loss", "value_loss", "value_clip_fraction", "clip_fraction"):
            assert got["stats"][key] == pytest.approx(single["stats"][key], rel=1e-5, abs=1e-6), key
    # the step moved both models (a parity of two no-ops would prove nothing)
    assert not torch.allclose(single["values_after"], single["values_before"], atol=1e-4)
    assert single["stats"]["value_loss"] > 0


def _dead_critic_worker(rank, world):
    import time

    from megatron_reft.critic_server import PeerLost
    from megatron_reft.distributed import roles
    from megatron_reft.engines import build_critic

    torch.set_num_threads(1)
    role = roles.start_split_world(dict(critic_world_size=1, actor_tp=1, actor_pp=1, critic_tp=1,
                                        critic_pp=1), seed=0)
    if role.name == "critic":
        return "exited"  # this process ends without serving: a dead critic rank
    from megatron_reft.config import load_config
    from megatron_reft.models.families import model_config_from_preset

    config = load_config(None, ["critic.mode=separate", "critic.world_size=1"])
    critic = build_critic(config, model_config_from_preset("tiny-llama", vocab_size=200))
    tokens = torch.ones(1, 4, dtype=torch.long)
    started = time.monotonic()
    try:
        critic.values([{"tokens": tokens, "labels": tokens, "action_mask": torch.ones(1, 4)}])
    except PeerLost as err:
        return str(err), time.monotonic() - started
    return "no error", 0.0


def test_dead_critic_rank_ends_the_actor_with_its_name():
    actor, critic = run_distributed(_dead_critic_worker, 2, init_process_group=False, timeout_s=300)
    message, seconds = actor
    assert critic == "exited"
    assert message.startswith("critic lead rank 1 is gone or did not answer"), message
    assert seconds < 60


def test_plan_split_refuses_impossible_splits():
    from megatron_reft.distributed.roles import plan_split

    split = plan_split(6, critic_world_size=2, actor_tp=2, actor_pp=2, critic_tp=1, critic_pp=2)
    assert split.actor.ranks == [0, 1, 2, 3] and split.critic.ranks == [4, 5]
    assert split.role_of(4).name == "critic" and split.critic.data_parallel == 1
    with pytest.raises(ValueError, match="critic ranks"):
        plan_split(4, critic_world_size=1, actor_tp=1, actor_pp=1, critic_tp=2, critic_pp=1)
    with pytest.raises(ValueError, match="at least one actor rank"):
        plan_split(2, critic_world_size=2, actor_tp=1, actor_pp=1, critic_tp=1, critic_pp=1)


def _ppo_run(out_dir: str, max_steps: int, mode: str) -> list[dict]:
    import json
    from pathlib import Path

    from megatron_reft.config import load_config
    from megatron_reft.distributed.init import shutdown
    from megatron_reft.rl.trainer import PPOTrainer

    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    config = load_config(str(repo / "configs" / "tiny_cpu.yaml"), [
        f"trainer.output_dir={out_dir}", f"trainer.max_steps={max_steps}", "trainer.save_interval=1",
        "trainer.eval_interval=1000", "trainer.progress_bar=false", "trainer.tensorboard=false",
        "data.synthetic_train_items=64", "data.synthetic_eval_items=4", "ppo.rollout_batch_size=4",
        "trainer.micro_batch_size=2", "data.max_total_length=48", "optim.lr=1e-3",
        f"critic.mode={mode}", "critic.lr=3e-3"])
    PPOTrainer(config).train()
    shutdown()
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _separate_resume_worker(rank, world, straight_dir, resumed_dir):
    straight = _ppo_run(straight_dir, 2, "separate")
    _ppo_run(resumed_dir, 1, "separate")
    return straight, _ppo_run(resumed_dir, 2, "separate")


def test_ppo_with_separate_critic_on_actor_ranks_resumes_exactly(tmp_path):
    """critic.mode=separate through the ppo job (critic on the actor's ranks): the critic's model
    and optimizer are saved with the policy's step and a resumed run equals a straight one."""
    straight, resumed = run_distributed(_separate_resume_worker, 1, str(tmp_path / "a"), str(tmp_path / "b"),
                                        init_process_group=False, timeout_s=600)[0]
    assert [m["step"] for m in resumed] == [1, 2]
    timing = {"step_time", "tokens_per_s", "tokens_per_s_per_device", "peak_memory_gib", "eval_accuracy", "critic_wait", "critic_overlap"}
    for a, b in zip(straight, resumed):
        assert a["value_loss"] > 0 and "critic_update_time" in a
        a = {k: v for k, v in a.items() if k not in timing and "time" not in k}
        b = {k: v for k, v in b.items() if k not in timing and "time" not in k}
        assert a == b
    critic_ckpt = tmp_path / "b" / "checkpoints" / "step_2"
    assert (critic_ckpt / "critic" / "weights").is_dir()
    _check_critic_export(critic_ckpt, tmp_path / "hf_critic")


def _critic_values_worker(rank, world, ckpt):
    from megatron_reft.checkpoint.io import load_checkpoint, read_model_yaml
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine

    torch.set_num_threads(1)
    initialize(1, 1, seed=0)
    engine = Engine(read_model_yaml(ckpt), with_value_head=True)
    load_checkpoint(ckpt, engine.module)
    tokens = torch.tensor([[5, 9, 17, 3, 40, 41, 7], [8, 8, 30, 2, 11, 12, 13]])
    values = engine.forward([{"tokens": tokens, "labels": tokens}])[0]["values"]
    shutdown()
    return tokens, values


def _check_critic_export(step_dir, out):
    """`convert megatron-to-hf --critic`: the trunk loads as a transformers model and, with the
    exported value_head.safetensors on its last hidden state, reproduces our values."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from megatron_reft.checkpoint.cli import main as convert_main

    no_critic = ["megatron-to-hf", "--ckpt", str(step_dir / "critic"), "--out", str(out), "--critic"]
    assert convert_main(no_critic) == 2  # a checkpoint without a separate critic: one line, exit 2
    assert not out.exists()
    assert convert_main(["megatron-to-hf", "--ckpt", str(step_dir), "--out", str(out), "--critic"]) == 0
    tokens, ours = run_distributed(_critic_values_worker, 1, str(step_dir / "critic"),
                                   init_process_group=False, timeout_s=300)[0]
    head = load_file(str(out / "value_head.safetensors"))
    trunk = AutoModel.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = trunk(input_ids=tokens).last_hidden_state
    theirs = hidden @ head["weight"].float().t() + head["bias"].float()
    torch.testing.assert_close(theirs.squeeze(-1), ours, atol=1e-4, rtol=1e-4)


def test_critic_config_errors_name_the_key():
    from megatron_reft.config import ConfigError, load_config, validate
    from megatron_reft.models.families import model_config_from_preset

    model = model_config_from_preset("tiny-llama", vocab_size=200)

    def errors(*overrides, job="ppo", world=4):
        config = load_config(None, ["data.train_file=synthetic", "model.preset=tiny-llama", *overrides])
        try:
            validate(config, model, job=job, world_size=world)
        except ConfigError as err:
            return str(err)
        return ""

    assert errors() == "" and errors("critic.mode=separate") == ""
    assert errors("critic.mode=both").startswith("critic.mode: 'both' is not one of shared, separate")
    assert "critic.tensor_model_parallel_size: a critic on the actor's ranks" in errors(
        "critic.mode=separate", "critic.tensor_model_parallel_size=2")
    assert "critic.pipeline_model_parallel_size: 3 does not divide model.num_layers=2" in errors(
        "critic.mode=separate", "critic.world_size=3", "critic.pipeline_model_parallel_size=3")
    assert "critic.world_size: 4 leaves no actor rank" in errors("critic.mode=separate", "critic.world_size=4")
    assert errors("critic.mode=separate", "critic.world_size=4", job="eval") == ""  # eval builds no critic
    assert errors("critic.mode=separate", "critic.world_size=2") == ""  # runnable from the CLI
    # the actor's batch rules see the actor's ranks only: 3 actor ranks do not divide 32 prompts
    assert "ppo.rollout_batch_size: 32 is not divisible by DP=3" in errors(
        "critic.mode=separate", "critic.world_size=1", world=4)

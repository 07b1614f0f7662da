"""The bf16 path, exercised on CPU.

On a GPU, `model.dtype: auto` means bf16. The engine then wraps the model in megatron's
`Float16Module`, the optimizer keeps fp32 main weights (`bf16=True`), and decoding and
scoring run in bf16. Those are different code paths from the fp32 CPU runs, and a CPU with
bf16 matmuls runs them too. At TP=1, TP=2 and PP=2, with the same weights:

- bf16 log-probs, entropy and values equal the fp32 engine's to bf16 rounding, and differ
  from them (so bf16 really ran);
- PPO updates: the fp32 main weights are what the optimizer steps, the bf16 model weights are
  their rounding after every step, and the first step's loss statistics match fp32's to
  rounding;
- the rollout's captured scores in bf16 equal the bf16 recompute pass to rounding (on this CPU
  exactly; a GPU's decode and training kernels differ, which is why
  `ppo.old_logprobs_from_rollout` is opt-in there);
- SFT, PPO (shared trunk and separate critic) and online-ST run with `model.dtype=bf16`; a run
  resumed from its step-2 checkpoint repeats the uninterrupted run's step 3 exactly, and the
  final checkpoints (bf16 weights, fp32 main weights, Adam state) are equal bit for bit.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from fault_utils import latest, tensors

REPO = Path(__file__).resolve().parents[1]
VOCAB = 200
PROMPTS = [[5, 9, 14], [7, 3, 8, 22, 41, 6], [11, 12], [30, 31, 32, 33]]
RESPONSE_LENGTHS = [9, 2, 12, 5]
KEYS = ("logprobs", "entropy", "values")
# bf16 keeps 8 mantissa bits: a log-prob of a few nats carries ~1e-2 of rounding through 2 layers
BF16_TOL = 0.05


def _rollout():
    from megatron_reft.rl.rollout import build_rollout_batch

    g = torch.Generator().manual_seed(3)
    responses = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in RESPONSE_LENGTHS]
    return build_rollout_batch(PROMPTS, responses, [True] * len(PROMPTS), pad_id=0)


def _engine(dtype):
    from megatron_reft.engine import Engine, OptimSettings
    from megatron_reft.models.families import model_config_from_preset

    return Engine(model_config_from_preset("tiny-llama", vocab_size=VOCAB), dtype=dtype, with_value_head=True,
                  optim=OptimSettings(lr=1e-3))


def _scores(engine, batch) -> dict:
    from megatron_reft.rl.rollout import gather_forward, micro_batches

    mbs = micro_batches(batch, list(range(batch.size)), 2)
    outs = engine.forward(mbs)
    return {k: gather_forward(outs, k, mbs, batch).float() * batch.action_mask for k in KEYS}


def _set_advantages(batch, scores: dict) -> None:
    from megatron_reft.rl import ppo_math

    mask = batch.action_mask
    rewards, _ = ppo_math.kl_penalized_rewards(torch.tensor([1.0, 0.0, 1.0, 0.5]), scores["logprobs"],
                                               scores["logprobs"] - 0.03, mask, 0.05)
    adv, returns = ppo_math.gae_advantages(rewards, scores["values"], mask)
    batch.tensors.update(old_logprobs=scores["logprobs"] - 0.1 * mask, values=scores["values"] + 0.05 * mask,
                         advantages=ppo_math.whiten_advantages(adv, mask), returns=returns)


def _main_params(optimizer) -> list[torch.Tensor]:
    """The optimizer's fp32 copies of the bf16 model weights (megatron's Float16Optimizer)."""
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for opt in optimizers for group in opt.fp32_from_float16_groups for p in group]


def _model_params(optimizer) -> list[torch.Tensor]:
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for opt in optimizers for group in opt.float16_groups for p in group]


def _updates(engine, batch, steps: int) -> list[dict]:
    from megatron_reft.config import load_config
    from megatron_reft.rl.rollout import micro_batches
    from megatron_reft.rl.trainer import ppo_loss_fn, reduce_stats

    loss_fn = ppo_loss_fn(load_config(None, []))
    results = []
    for _ in range(steps):
        engine.module.train()
        out = engine.train_step(micro_batches(batch, list(range(batch.size)), 2), loss_fn)
        results.append({"stats": {k: float(v) for k, v in reduce_stats(out["stats"]).items()},
                        "update_ok": out["update_ok"], "grad_norm": out["grad_norm"]})
    return results


def _captured_vs_recomputed(engine) -> dict:
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.rl.rollout import build_rollout_batch

    out = generate(engine, PROMPTS, 0, SamplingParams(max_new_tokens=8, max_total_length=24, ignore_eos=True),
                   seed=2, return_logprobs=True)
    scores = {"logprobs": out.logprobs, "entropy": out.entropies, "values": out.values}
    batch = build_rollout_batch(PROMPTS, out.tokens, out.finished, 0, scores)
    return {"captured": {k: v.float() * batch.action_mask for k, v in batch.rollout_outputs.items()},
            "recomputed": _scores(engine, batch)}


def _worker(rank, world, tp, pp):
    from megatron_reft.distributed.init import initialize, shutdown

    torch.set_num_threads(1)
    initialize(tp, pp, seed=5)
    fp32, bf16 = _engine(torch.float32), _engine(torch.bfloat16)
    fp32.init_from_scratch(11)
    with torch.no_grad():  # the same weights, rounded to bf16
        for (name, p16), (_, p32) in zip(bf16.gpt.named_parameters(), fp32.gpt.named_parameters()):
            p16.copy_(p32)
    bf16._sync_param_copies()
    out = {"dtypes": sorted({str(p.dtype) for p in bf16.gpt.parameters()}),
           "main_dtypes": sorted({str(p.dtype) for p in _main_params(bf16.optimizer)})}
    batch = _rollout()
    out["forward"] = {"fp32": _scores(fp32, batch), "bf16": _scores(bf16, batch)}
    _set_advantages(batch, out["forward"]["fp32"])
    out["updates"] = {"fp32": _updates(fp32, batch, 3), "bf16": _updates(bf16, batch, 3)}
    main, model = _main_params(bf16.optimizer), _model_params(bf16.optimizer)
    out["rounding_gap"] = max((m.to(torch.bfloat16) - w).abs().max().item() for m, w in zip(main, model))
    out["main_moved"] = max((m - w.float()).abs().max().item() for m, w in zip(main, model))
    out["captured"] = _captured_vs_recomputed(bf16)
    shutdown()
    return out


@pytest.fixture(scope="module", params=[(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def ranks(request):
    tp, pp = request.param
    return run_distributed(_worker, tp * pp, tp, pp, init_process_group=False, timeout_s=300)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_bf16_weights_with_fp32_main_copies(ranks):
    r = ranks[0]
    assert r["dtypes"] == ["torch.bfloat16"]
    assert r["main_dtypes"] == ["torch.float32"]


def test_bf16_scores_equal_fp32_to_rounding(ranks):
    for r in ranks:
        for key in KEYS:
            diff = _max_diff(r["forward"]["bf16"][key], r["forward"]["fp32"][key])
            assert 0 < diff <= BF16_TOL, (key, diff)  # > 0: it really ran in bf16


def test_bf16_updates_step_the_fp32_main_weights(ranks):
    for r in ranks:
        steps32, steps16 = r["updates"]["fp32"], r["updates"]["bf16"]
        assert all(s["update_ok"] and math.isfinite(s["grad_norm"]) for s in steps16)
        first32, first16 = steps32[0]["stats"], steps16[0]["stats"]
        for key in ("policy_loss", "value_loss", "ratio_mean"):
            assert first16[key] == pytest.approx(first32[key], abs=BF16_TOL), key
        assert steps16[0]["grad_norm"] == pytest.approx(steps32[0]["grad_norm"], rel=0.05)
        # the model's bf16 weights are the rounding of the optimizer's fp32 ones after each step,
        # and the fp32 ones carry what bf16 cannot hold (lr 1e-3 updates below bf16's resolution)
        assert r["rounding_gap"] == 0.0
        assert r["main_moved"] > 0.0
        assert steps16[-1]["stats"]["policy_loss"] < steps16[0]["stats"]["policy_loss"]


def test_bf16_rollout_scores_equal_the_bf16_recompute_to_rounding(ranks):
    for r in ranks:
        for key in KEYS:
            diff = _max_diff(r["captured"]["captured"][key], r["captured"]["recomputed"][key])
            assert diff <= BF16_TOL, (key, diff)


def _job_worker(rank, world, job, out_dir, max_steps, overrides):
    from megatron_reft.config import load_config
    from megatron_reft.distributed.init import shutdown

    torch.set_num_threads(1)
    config = load_config(str(REPO / "configs" / "tiny_cpu.yaml"), [
        f"trainer.output_dir={out_dir}", f"trainer.max_steps={max_steps}", "trainer.save_interval=2",
        "trainer.eval_interval=1000", "trainer.progress_bar=false", "trainer.tensorboard=false",
        "data.synthetic_train_items=16", "data.synthetic_eval_items=2", "ppo.rollout_batch_size=4",
        "trainer.micro_batch_size=2", "trainer.global_batch_size=4", "data.max_total_length=40",
        "model.dtype=bf16", *overrides])
    if job == "ppo":
        from megatron_reft.rl.trainer import PPOTrainer

        PPOTrainer(config).train()
    elif job == "online-st":
        from megatron_reft.rl.online_st import OnlineSTTrainer

        OnlineSTTrainer(config).train()
    else:
        from megatron_reft.sft.trainer import run

        run(config)
    shutdown()
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _train(job: str, out_dir: Path, max_steps: int, overrides: list[str], world: int = 1) -> list[dict]:
    return run_distributed(_job_worker, world, job, str(out_dir), max_steps, overrides, init_process_group=False,
                           timeout_s=600)[0]


def _checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor (model + optimizer, and a separate critic's) of the run's latest checkpoint."""
    checkpoint = run_dir / "checkpoints" / latest(run_dir)
    found = {}
    for part in sorted(weights.parent for weights in checkpoint.glob("**/weights")):
        found.update({f"{part.relative_to(checkpoint)}:{k}": v for k, v in tensors(part).items()})
    return found


DISTRIBUTED_OPTIMIZER = "parallel.use_distributed_optimizer=true"


@pytest.mark.parametrize("job, overrides, world", [
    ("ppo", ["ppo.old_logprobs_from_rollout=true"], 1), ("ppo", ["critic.mode=separate"], 1),
    ("online-st", [], 1), ("sft", [], 1),
    ("ppo", [DISTRIBUTED_OPTIMIZER], 1), ("sft", [DISTRIBUTED_OPTIMIZER], 2),
    ("sft", [DISTRIBUTED_OPTIMIZER, "model.dtype=fp32"], 2)],
    ids=["ppo", "ppo-separate-critic", "online-st", "sft", "ppo-distributed-optimizer",
         "sft-distributed-optimizer-dp2", "sft-distributed-optimizer-dp2-fp32"])
def test_resume_is_bit_identical(tmp_path, job, overrides, world):
    """Three steps, and the same run stopped after its step-2 checkpoint and resumed: the weights,
    the optimizer's fp32 main weights and Adam state all come back exactly. Bugs this caught: a
    PPO resume refreshed the main weights from the bf16 ones after loading (every restart rounded
    them to bf16); the distributed optimizer (the 7B recipes') could not save at all, could not
    load into an optimizer that had not stepped, and restarted Adam's bias correction."""
    straight = _train(job, tmp_path / "straight", 3, overrides, world)
    assert [s["step"] for s in straight] == [1, 2, 3]
    _train(job, tmp_path / "resumed", 2, overrides, world)
    resumed = _train(job, tmp_path / "resumed", 3, overrides, world)
    assert [s["step"] for s in resumed] == [1, 2, 3]
    keys = {"sft": ("loss", "lr", "grad_norm"), "online-st": ("grad_norm", "reward_mean", "response_length")}.get(
        job, ("policy_loss", "value_loss", "kl", "grad_norm", "reward_mean", "response_length", "ratio_mean"))
    for key in keys:
        assert math.isfinite(straight[-1][key]), key
        assert resumed[-1][key] == straight[-1][key], key
    a, b = _checkpoint_tensors(tmp_path / "straight"), _checkpoint_tensors(tmp_path / "resumed")
    assert sorted(a) == sorted(b) and any("optimizer" in k for k in a)
    if "model.dtype=fp32" not in overrides:
        assert any(v.dtype == torch.bfloat16 for v in a.values()) and any(v.dtype == torch.float32 for v in a.values())
    # The distributed optimizer stores flat buckets whose padding is uninitialised memory: its
    # Adam state is checked through step 3's update instead (the weights after it are compared).
    compared = [k for k in a if ".distributed." not in k]
    assert any(":model." in k for k in compared)
    different = [k for k in compared if not torch.equal(a[k], b[k])]
    assert not different, different

"""`megatron-reft online-st` (reft.md §6 online self-training) end to end on configs/tiny_cpu.yaml:
ReFT's loop with the supervised update, no reference model and no value head.

From random weights no sample is correct, so the update is the gold half alone: sample_ce must be
0 exactly, gold_ce (the mini-batch's gold-token CE before each update, one PPO epoch) must fall as
the model learns the gold CoTs, and the checkpoint must hold no value head.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def test_online_self_training_runs_and_learns_the_gold_cots(tmp_path):
    out = tmp_path / "ost"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    command = [sys.executable, "-m", "megatron_reft.cli", "online-st", "--config", str(TINY),
               f"trainer.output_dir={out}", "trainer.max_steps=3", "ppo.ppo_epochs=1", "data.synthetic_eval_items=4",
               "trainer.progress_bar=false", "trainer.tensorboard=false"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["accuracy"] == 0 and r["sample_ce"] == 0.0 for r in rows)  # nothing correct yet
    gold = [r["gold_ce"] for r in rows]
    assert gold[0] > gold[1] > gold[2] > 0, gold
    assert "kl" not in rows[0] and "value_loss" not in rows[0]
    assert rows[-1]["eval_accuracy"] is not None
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(out / "checkpoints" / "step_3" / "weights")).read_metadata().state_dict_metadata
    assert not any("value_head" in k for k in keys)
    assert any("optimizer" in k for k in keys)


# ---------------------------------------------------------------- the update's accounting
def _combined(vocab: int):
    """4 sampled sequences (rewards 1, 0.1, 0, 1) + their 4 gold CoTs, random tokens."""
    import torch

    from megatron_reft.rl.rollout import build_rollout_batch

    g = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rand(n) for n in (3, 5, 4, 3)] + [rand(n) for n in (2, 4, 3, 3)]
    responses = [rand(n) for n in (6, 2, 4, 5)] + [rand(n) for n in (7, 3, 5, 2)]
    batch = build_rollout_batch(prompts, responses, [True] * 8, pad_id=0)
    batch.tensors.update(is_gold=torch.tensor([0.0] * 4 + [1.0] * 4),
                         scores=torch.tensor([1.0, 0.1, 0.0, 1.0, 0, 0, 0, 0]))
    return batch


def _online_st_worker(rank, world, micro_batch_sizes):
    import torch

    torch.set_num_threads(1)
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine, OptimSettings
    from megatron_reft.models.families import model_config_from_preset

    initialize(1, 1, seed=3)
    batch = _combined(200)
    results = []
    for micro_batch_size in micro_batch_sizes:  # a fresh engine (and optimizer) for each
        engine = Engine(model_config_from_preset("tiny-llama", vocab_size=200), optim=OptimSettings(lr=1e-2))
        engine.init_from_scratch(5)
        results.append(_one_step(engine, batch, micro_batch_size))
    shutdown()
    return results


def _one_step(engine, batch, micro_batch_size):
    import torch
    from megatron.core import parallel_state as ps

    from megatron_reft.rl.online_st import online_st_train_step
    from megatron_reft.rl.rollout import gather_forward, micro_batches
    from megatron_reft.rl.self_training import correct_sample_mask, online_self_training_loss
    from megatron_reft.rl.trainer import reduce_stats

    def logprobs():  # [8, S] in the batch's row order (micro-batches are length-sorted)
        mbs = micro_batches(batch, list(range(8)), 8)
        return gather_forward(engine.forward(mbs), "logprobs", mbs, batch)

    before = logprobs()
    gold = batch.tensors["is_gold"].bool()
    expected, _ = online_self_training_loss(  # the formula on the whole batch, one process
        before[:4], correct_sample_mask(batch.tensors["scores"][:4], batch.action_mask[:4]),
        before[4:], batch.action_mask[gold])
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(4))[dp_rank * 4 // dp:(dp_rank + 1) * 4 // dp]
    engine.module.train()
    result = online_st_train_step(engine, batch, mine, micro_batch_size)
    stats = reduce_stats(result["stats"])
    after = logprobs()
    return {"expected": float(expected), "stats": stats, "grad_norm": result["grad_norm"],
            "after": after * batch.action_mask, "before": before * batch.action_mask}


def test_update_is_the_formula_whatever_the_micro_batching_and_dp():
    import pytest
    import torch

    from dist_utils import run_distributed

    whole, split = run_distributed(_online_st_worker, 1, [8, 1], init_process_group=False, timeout_s=300)[0]
    dp2 = [r[0] for r in run_distributed(_online_st_worker, 2, [2], init_process_group=False, timeout_s=300)]
    ref = whole
    assert 0.5 * ref["stats"]["sample_ce"] + 0.5 * ref["stats"]["gold_ce"] == pytest.approx(ref["expected"], rel=1e-5)
    assert (ref["after"] - ref["before"]).abs().max() > 1e-3  # the step moved the model
    for got in [split] + dp2:
        for key in ("sample_ce", "gold_ce"):
            assert got["stats"][key] == pytest.approx(ref["stats"][key], rel=1e-5), key
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        torch.testing.assert_close(got["after"], ref["after"], atol=2e-5, rtol=1e-5)

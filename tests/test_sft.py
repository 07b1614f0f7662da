"""Warm-up SFT end to end through the CLI (`megatron-reft sft --config configs/tiny_cpu.yaml`):
one process, `torchrun --nproc-per-node 2` with TP=2 and with PP=2, and resume — plus the
learning-rate schedule with hand-computed values.

Runs (each a real subprocess; megatron's import costs a few seconds per process):
- straight: 6 steps on one process;
- resumed:  3 steps, stop, rerun the same command with max_steps=6 → identical losses and
            bit-identical weights and optimizer state (CPU);
- tp2:      3 steps under torchrun, TP=2 → the straight run's losses within 1e-5;
- pp2:      2 steps under torchrun, PP=2, then resumed to 3 → same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import find_free_port
from megatron_reft.runtime import learning_rate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


# ---------------------------------------------------------------- learning-rate schedule
def test_linear_warmup_then_decay_hand_computed():
    # 20 planned steps, 10% warm-up = 2 steps; base 1e-5, decaying to min_lr 1e-6
    lr = [learning_rate(s, 20, 1e-5, "linear", 0.1, 1e-6) for s in range(22)]
    assert lr[0] == pytest.approx(0.5e-5)  # warm-up: (step + 1) / warmup_steps
    assert lr[1] == pytest.approx(1e-5)
    assert lr[2] == pytest.approx(1e-5)  # decay starts at the peak
    assert lr[11] == pytest.approx(1e-6 + 9e-6 * (1 - 9 / 18))  # = 5.5e-6
    assert lr[19] == pytest.approx(1e-6 + 9e-6 / 18)
    assert lr[20] == lr[21] == pytest.approx(1e-6)  # past the plan: stays at min_lr
    assert all(a >= b for a, b in zip(lr[1:], lr[2:]))


def test_reference_sft_schedule():
    # reft.md §5: lr 1e-5, 10% warm-up over a 40-epoch run (GSM8K N-CoT: 7465 items / batch 48)
    steps_per_epoch = 7465 // 48  # 155
    total = 40 * steps_per_epoch  # 6200 planned steps, warm-up 620
    assert learning_rate(0, total, 1e-5, "linear", 0.1) == pytest.approx(1e-5 / 620)
    assert learning_rate(619, total, 1e-5, "linear", 0.1) == pytest.approx(1e-5)
    assert learning_rate(620 + 2790, total, 1e-5, "linear", 0.1) == pytest.approx(0.5e-5)
    # the warm-up checkpoint (end of epoch 2) is still in warm-up: lr = 310/620 · 1e-5
    assert learning_rate(2 * steps_per_epoch - 1, total, 1e-5, "linear", 0.1) == pytest.approx(0.5e-5)


def test_no_warmup_and_constant():
    assert learning_rate(0, 10, 1e-3, "linear", 0.0) == 1e-3
    assert learning_rate(5, 10, 1e-3, "linear", 0.0) == pytest.approx(0.5e-3)
    # PPO (reft.md §5): 3e-7 constant
    assert {learning_rate(s, 100, 3e-7, "constant", 0.1) for s in (0, 5, 99, 1000)} == {3e-7}


def test_tiny_recipe_schedule_matches_logged_lr():
    # tiny_cpu.yaml: 256 items / batch 16 = 16 steps per epoch, 2 epochs → 32 planned, warm-up 3
    expected = [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3 * (1 - 1 / 29), 1e-3 * (1 - 2 / 29)]
    assert [learning_rate(s, 32, 1e-3, "linear", 0.1) for s in range(6)] == pytest.approx(expected)


# ---------------------------------------------------------------- CLI runs
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return env


def _command(out: Path, steps: int, nproc: int = 1, *extra: str) -> list[str]:
    job = ["-m", "megatron_reft.cli", "sft", "--config", str(TINY), f"trainer.output_dir={out}",
           f"trainer.max_steps={steps}", "trainer.progress_bar=false", *extra]
    if nproc == 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(find_free_port()), *job]


def _run(command: list[str], cwd: Path) -> str:
    proc = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(command)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{out[-3000:]}\n{err[-6000:]}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All CLI runs of this module, once. Returns {name: (run dir, stdout of the last command)}."""
    root = tmp_path_factory.mktemp("sft_cli")
    out = {name: root / name for name in ("straight", "resumed", "tp2", "pp2")}
    # the two single-process starts are independent: run them side by side (2 cores)
    straight = _start(_command(out["straight"], 6), root)
    first_half = _start(_command(out["resumed"], 3), root)
    logs = {"straight": _wait(straight), "resumed_first": _wait(first_half)}
    logs["resumed"] = _run(_command(out["resumed"], 6), root)
    logs["tp2"] = _run(_command(out["tp2"], 3, 2, "parallel.tensor_model_parallel_size=2"), root)
    logs["pp2_first"] = _run(_command(out["pp2"], 2, 2, "parallel.pipeline_model_parallel_size=2"), root)
    logs["pp2"] = _run(_command(out["pp2"], 3, 2, "parallel.pipeline_model_parallel_size=2"), root)
    return out, logs


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (model + optimizer), read without megatron."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(checkpoint / "weights"))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
             if isinstance(v, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def test_run_directory_layout(runs):
    from megatron_reft.config import load_config

    out, logs = runs
    run = out["straight"]
    assert "layout: world=1 TP=1 PP=1 DP=1" in logs["straight"]
    config = load_config(run / "config.yaml")  # the effective config, overrides included
    assert config.trainer.max_steps == 6 and config.trainer.output_dir == str(run)
    assert config.model.preset == "tiny-llama" and config.optim.lr == 1e-3

    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "epoch"} <= set(m)
        assert m["loss"] > 0 and m["tokens_per_s"] > 0
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    expected_lr = [learning_rate(s, 32, 1e-3, "linear", 0.1) for s in range(6)]
    assert [m["lr"] for m in metrics] == pytest.approx(expected_lr)
    assert "eval_loss" in metrics[-1]  # evaluated at the last step

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "system/tokens_per_s", "timing/train", "eval/loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_6"
    step6 = ckpts / "step_6"
    for name in ("model.yaml", "weights", "trainer_state.json", "tokenizer", "rng"):
        assert (step6 / name).exists(), name
    assert any((step6 / "weights").iterdir())
    state = json.loads((step6 / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["job"] == "sft" and state["metrics"]["loss"] == metrics[-1]["loss"]
    assert not list(ckpts.glob("*.tmp"))


def test_resume_is_bit_identical(runs):
    out, logs = runs
    assert "resumed from" in logs["resumed"] and "at step 3" in logs["resumed"]
    assert "resumed from" not in logs["resumed_first"]
    straight, resumed = _metrics(out["straight"]), _metrics(out["resumed"])
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]  # no duplicated or missing lines
    for a, b in zip(straight, resumed):
        assert (a["loss"], a["lr"], a["grad_norm"]) == (b["loss"], b["lr"], b["grad_norm"]), a["step"]
    assert straight[5]["eval_loss"] == resumed[5]["eval_loss"]
    # both kept step_3 and step_6 → latest; weights and optimizer state equal bit for bit
    ckpt_a, ckpt_b = out["straight"] / "checkpoints" / "step_6", out["resumed"] / "checkpoints" / "step_6"
    assert (out["resumed"] / "checkpoints" / "latest").read_text().strip() == "step_6"
    ta, tb = _tensors(ckpt_a), _tensors(ckpt_b)
    assert sorted(ta) == sorted(tb) and any(k.startswith("optimizer.") for k in ta)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different
    sa = json.loads((ckpt_a / "trainer_state.json").read_text())
    sb = json.loads((ckpt_b / "trainer_state.json").read_text())
    assert sa["sampler"] == sb["sampler"]


@pytest.mark.parametrize("name, layout", [("tp2", "TP=2 PP=1 DP=1"), ("pp2", "TP=1 PP=2 DP=1")])
def test_torchrun_layouts_match_one_process(runs, name, layout):
    out, logs = runs
    assert f"layout: world=2 {layout}" in logs[name] and "launcher: torchrun" in logs[name]
    straight, parallel = _metrics(out["straight"]), _metrics(out[name])
    assert [m["step"] for m in parallel] == [1, 2, 3]
    for a, b in zip(straight, parallel):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]
        assert b["lr"] == a["lr"]
    step3 = out[name] / "checkpoints" / "step_3"
    assert sorted(p.name for p in (step3 / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert (out[name] / "checkpoints" / "latest").read_text().strip() == "step_3"
    if name == "pp2":
        assert "resumed from" in logs["pp2"] and "at step 2" in logs["pp2"]

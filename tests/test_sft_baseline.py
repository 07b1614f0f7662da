"""SFT as the paper's baseline (reft.md §6 "SFT, best epoch"): greedy test accuracy at every
epoch end, a `best` checkpoint by that accuracy, and the epoch checkpoints named in
`trainer.keep_epochs` surviving `trainer.keep_last` pruning (the warm-up is taken from one).

One real run on configs/tiny_cpu.yaml (64 items / batch 16 = 4 steps per epoch, 3 epochs),
then `megatron-reft eval` of `best` must reproduce the accuracy SFT logged for it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
SMALL = ["data.synthetic_train_items=64", "data.synthetic_eval_items=8", "trainer.progress_bar=false",
         "trainer.tensorboard=false"]


def _run(command: list[str], cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"{' '.join(command)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_accuracy_every_epoch_best_checkpoint_and_kept_epochs(tmp_path):
    out = tmp_path / "sft"
    _run([sys.executable, "-m", "megatron_reft.cli", "sft", "--config", str(TINY), f"trainer.output_dir={out}",
          "trainer.epochs=3", "trainer.keep_last=1", "trainer.keep_epochs=[1]", *SMALL], tmp_path)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}
    assert sorted(evaluated) == [4, 8, 12]  # every epoch end, and only there
    ckpts = out / "checkpoints"
    # keep_last=1 keeps step_12 only; epoch 1 (step_4) is protected by keep_epochs; step_8 pruned
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["best", "step_12", "step_4"]
    assert (ckpts / "latest").read_text().strip() == "step_12"  # best never becomes "latest"
    best_state = json.loads((ckpts / "best" / "trainer_state.json").read_text())
    best_accuracy = max(evaluated.values())
    first_best_step = min(s for s, a in evaluated.items() if a == best_accuracy)
    assert best_state["step"] == first_best_step and best_state["best_accuracy"] == best_accuracy
    assert json.loads((ckpts / "step_12" / "trainer_state.json").read_text())["best_accuracy"] == best_accuracy

    # the eval command on `best` sees the same held-out items and reproduces the logged accuracy
    proc = _run([sys.executable, "-m", "megatron_reft.cli", "eval", "--config", str(TINY),
                 "--ckpt", str(ckpts / "best"), f"trainer.output_dir={tmp_path / 'eval'}", *SMALL], tmp_path)
    line = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    assert line["n"] == 8 and line["accuracy"] == best_accuracy


def test_keep_epochs_must_be_a_list_of_epochs(tmp_path):
    proc = _run([sys.executable, "-m", "megatron_reft.cli", "sft", "--config", str(TINY),
                 f"trainer.output_dir={tmp_path / 'x'}", "trainer.keep_epochs=2"], tmp_path, expect=2)
    assert "trainer.keep_epochs: 2 must be a list of epoch numbers >= 1" in proc.stderr
    assert not (tmp_path / "x").exists()

"""The baselines' training jobs from the command line under torchrun with two data-parallel ranks
(gloo, CPU), checked against the same job in one process, and the reward model's resume
(issue 13: "every method runs end to end ... under torchrun (DP=2)").

- online-st: from random weights no sample is correct, so each update is the gold-CoT half alone,
  a mean over the global mini-batch; DP=2 splits that mini-batch over two ranks, so gold_ce step
  by step must equal the single-process run's (the sampled tokens differ, and do not count).
- train-rm: the classifier's loss and accuracy per step are global-batch means: DP=2 = DP=1.
- train-rm interrupted after epoch 1 and rerun (auto-resume from checkpoints/latest) ends with
  the straight run's weights and optimizer state, bit for bit (constant lr: the interruption is
  `trainer.epochs=1`, the schedule must not depend on it).
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

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
COMMON = ["trainer.progress_bar=false", "trainer.tensorboard=false"]
RM_ITEMS = ["data.synthetic_train_items=8", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
            "optim.schedule=constant", "data.max_total_length=256"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return env


def _cli(job: list[str], cwd: Path, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(find_free_port())]
    command = [*launcher, "-m", "megatron_reft.cli", *job, *COMMON]
    proc = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(command)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def warmup(tmp_path_factory) -> Path:
    """A 1-step SFT checkpoint: the reward model's initialisation."""
    root = tmp_path_factory.mktemp("baselines_dp2")
    _cli(["sft", "--config", str(TINY), f"trainer.output_dir={root / 'sft'}", "trainer.max_steps=1"], root)
    return root / "sft" / "checkpoints" / "step_1"


def test_online_st_dp2_trains_as_one_process(tmp_path):
    job = ["online-st", "--config", str(TINY), "trainer.max_steps=2", "ppo.ppo_epochs=1",
           "data.synthetic_eval_items=4", "trainer.micro_batch_size=2"]
    _cli(job + [f"trainer.output_dir={tmp_path / 'dp1'}"], tmp_path)
    _cli(job + [f"trainer.output_dir={tmp_path / 'dp2'}"], tmp_path, nproc=2)
    one, two = _rows(tmp_path / "dp1"), _rows(tmp_path / "dp2")
    assert [r["step"] for r in two] == [1, 2] and two[-1]["eval_accuracy"] is not None
    assert all(r["sample_ce"] == 0.0 for r in one + two)  # nothing correct: the gold half alone
    for a, b in zip(one, two):
        assert b["gold_ce"] == pytest.approx(a["gold_ce"], rel=1e-5), (a["gold_ce"], b["gold_ce"])
    assert two[1]["gold_ce"] < two[0]["gold_ce"]
    assert (tmp_path / "dp2" / "checkpoints" / "latest").read_text().strip() == "step_2"


def _sample_store(root: Path) -> Path:
    """offline-st-data's store format for the 8 synthetic train questions: per question the gold
    CoT (correct) and a wrong answer (incorrect)."""
    from megatron_reft.config import load_config
    from megatron_reft.data.synthetic import make_synthetic_splits

    d = load_config(TINY, ["data.synthetic_train_items=8"]).data
    train, _ = make_synthetic_splits(d.synthetic_train_items, d.synthetic_eval_items, d.synthetic_seed,
                                     d.synthetic_difficulty, d.cot_type)
    store = root / "store"
    store.mkdir()
    sample = lambda text, ok: {"response": text, "extracted": None, "status": "ok", "correct": ok,  # noqa: E731
                               "reward": float(ok)}
    lines = [{"id": r.id, "answer": r.answer, "samples": [sample(r.cot, True), sample("The answer is 0.", False)]}
             for r in train]
    (store / "rank0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return store


def _rm_job(store: Path, warmup: Path, out: Path, epochs: int) -> list[str]:
    return ["train-rm", "--config", str(TINY), "--samples-dir", str(store), f"model.load={warmup}",
            f"trainer.output_dir={out}", f"trainer.epochs={epochs}", *RM_ITEMS]


def _state(ckpt: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = ckpt.parent / f"{ckpt.parent.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt / "weights"), str(flat))
    return torch.load(flat, weights_only=False)


def _flatten(tree, prefix="") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flatten(value, f"{prefix}{i}.").items()}
    return {prefix: tree}


def test_train_rm_dp2_matches_one_process_and_resume_is_exact(warmup, tmp_path):
    store = _sample_store(tmp_path)
    _cli(_rm_job(store, warmup, tmp_path / "straight", epochs=2), tmp_path)
    _cli(_rm_job(store, warmup, tmp_path / "dp2", epochs=2), tmp_path, nproc=2)
    straight, dp2 = _rows(tmp_path / "straight"), _rows(tmp_path / "dp2")
    assert [r["step"] for r in straight] == [1, 2, 3, 4]  # 16 samples / batch 8, 2 epochs
    for a, b in zip(straight, dp2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["train_accuracy"] == a["train_accuracy"]

    # interrupted after epoch 1, then the same run asked for 2 epochs: resumes from step_2
    _cli(_rm_job(store, warmup, tmp_path / "resumed", epochs=1), tmp_path)
    _cli(_rm_job(store, warmup, tmp_path / "resumed", epochs=2), tmp_path)
    resumed = {r["step"]: r for r in _rows(tmp_path / "resumed")}
    assert sorted(resumed) == [1, 2, 3, 4]
    for row in straight:
        assert (resumed[row["step"]]["loss"], resumed[row["step"]]["train_accuracy"]) == \
            (row["loss"], row["train_accuracy"])
    a = _flatten(_state(tmp_path / "straight" / "checkpoints" / "step_4"))
    b = _flatten(_state(tmp_path / "resumed" / "checkpoints" / "step_4"))
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert tensors and set(a) == set(b)
    assert any("value_head" in k for k in tensors) and any("optim" in k for k in tensors)
    for key in tensors:
        assert torch.equal(a[key], b[key]), key

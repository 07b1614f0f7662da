"""kill -9 of a rank at PP=2, of a PPO rank, and inside a save (issue 11, docs/reliability.md).

Through torchrun (gloo) on the tiny CPU config, as a user runs it. Each case asserts: the job
ends within 60 s of the kill with the dead rank named, no process it started is left (counted
through the environment tag every child inherits, plus the reward-sandbox workers, which run
with an empty environment), and a rerun in the same directory resumes and ends bit-exactly
where an uninterrupted run ends (every weight and optimizer tensor, every logged loss).
The TP=2 SFT kill (rank and launcher) is in test_fault_injection.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fault_utils import (REPO, command, env, kill_all, latest, metrics, sandbox_pids, tagged_pids, tensors,
                         wait_for, wait_for_no_processes)

pytestmark = pytest.mark.timeout(900) if hasattr(pytest.mark, "timeout") else []

KILL_HOOK = "MEGATRON_REFT_TEST_KILL_IN_SAVE"  # reliability/faultpoints.py
LAYOUTS = {"tp2": ("parallel.tensor_model_parallel_size=2",),
           "pp2": ("parallel.pipeline_model_parallel_size=2",)}
# P-CoT, so the reward sandbox runs (its workers must not outlive the job); 8 rollout batches
# per epoch, so the first epoch-end evaluation comes after the last compared step.
PPO = ("data.cot_type=pcot", "data.synthetic_train_items=32", "data.synthetic_eval_items=4",
       "ppo.rollout_batch_size=4", "data.max_prompt_length=96", "data.max_total_length=112")
TARGET = {"sft": 8, "ppo": 6}  # the step every run in a comparison ends at
COMPARED = {"sft": ("loss", "grad_norm"), "ppo": ("reward_mean", "kl", "policy_loss", "value_loss", "grad_norm")}


def _overrides(job: str, layout: str) -> tuple[str, ...]:
    return ("trainer.save_interval=1", *LAYOUTS[layout], *(PPO if job == "ppo" else ()))


def _start(job: str, out: Path, layout: str, max_steps: int, tag: str, **extra) -> subprocess.Popen:
    cmd = command(job, out, f"trainer.max_steps={max_steps}", *_overrides(job, layout), nproc=2)
    return subprocess.Popen(cmd, cwd=REPO, env=env(tag, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs to TARGET, one per (job, layout), made on first use."""
    made = {}

    def get(job: str, layout: str) -> Path:
        if (job, layout) not in made:
            out = tmp_path_factory.mktemp(f"ref-{job}-{layout}") / "run"
            _finish(_start(job, out, layout, TARGET[job], f"ref-{job}-{layout}-{out.parent.name}"))
            made[job, layout] = out
        return made[job, layout]
    return get


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """{global rank: pid} of torchrun's workers (read from their RANK variable)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    ranks = {}
    for pid in map(int, children.read_text().split() if children.is_file() else []):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks.update({int(v[5:]): pid for v in environ if v.startswith(b"RANK=")})
    return ranks


def _assert_ended_clean(job: subprocess.Popen, tag: str, killed_at: float, rank: int) -> None:
    """Non-zero exit within 60 s of the kill, torchrun names the SIGKILLed rank, nothing left."""
    _, err = job.communicate(timeout=60)
    assert job.returncode != 0, err[-3000:]
    left = wait_for_no_processes(tag, max(1.0, 60 - (time.monotonic() - killed_at)))
    assert not left, f"left behind: {left}"
    wait_for(lambda: not sandbox_pids(), max(1.0, 60 - (time.monotonic() - killed_at)), "sandbox workers to exit")
    assert time.monotonic() - killed_at < 60
    root_cause = err.split("Root Cause", 1)[-1]
    assert f"rank      : {rank}" in root_cause and "SIGKILL" in root_cause, err[-3000:]


def _assert_resumes_bit_exact(job: str, layout: str, out: Path, reference: Path, resumed_from: str,
                              tag: str) -> str:
    stdout = _finish(_start(job, out, layout, TARGET[job], tag + "-rerun"))
    assert f"resumed from {out / 'checkpoints' / resumed_from} at step {resumed_from[5:]}" in stdout
    final = f"step_{TARGET[job]}"
    a, b = tensors(out / "checkpoints" / final), tensors(reference / "checkpoints" / final)
    assert sorted(a) == sorted(b) and a
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    got, want = metrics(out), metrics(reference)
    assert [m["step"] for m in got] == list(range(1, TARGET[job] + 1))
    for key in COMPARED[job]:
        assert [m[key] for m in got] == [m[key] for m in want], key
    return stdout


# rank 0 of PPO: it holds the run lock, writes metrics and runs the reward sandbox's workers;
# rank 1 of PPO at PP=2: the last stage, which computes the logits, values and losses
@pytest.mark.parametrize("job,layout,victim", [("sft", "pp2", 1), ("ppo", "tp2", 0), ("ppo", "pp2", 1)])
def test_kill_9_of_a_rank_during_training_leaves_nothing_and_resumes_bit_exact(tmp_path, reference, job, layout,
                                                                               victim):
    out, tag = tmp_path / "run", f"kill-{job}-{layout}-{tmp_path.name}"
    proc = _start(job, out, layout, 200 if job == "sft" else TARGET[job], tag)
    try:
        early = ("step_2", "step_3", "step_4") if job == "sft" else ("step_1", "step_2", "step_3")
        wait_for(lambda: latest(out) in early, 240, f"{early[0]} saved", proc)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1]
        started = len(tagged_pids(tag))
        assert started >= 3  # torchrun + 2 ranks (+ their helpers): what must be gone afterwards
        if job == "ppo":
            assert sandbox_pids(), "no sandbox worker running: the PPO case would test nothing"
        killed_at = time.monotonic()
        os.kill(ranks[victim], signal.SIGKILL)
        _assert_ended_clean(proc, tag, killed_at, rank=victim)
    finally:
        kill_all(tag)
    resumed_from = latest(out)
    assert int(resumed_from[5:]) < TARGET[job], "the job finished before the kill: nothing was tested"
    _assert_resumes_bit_exact(job, layout, out, reference(job, layout), resumed_from, tag)


@pytest.mark.parametrize("layout,rank,point", [("pp2", 1, "shards"), ("tp2", 0, "renamed")])
def test_kill_9_inside_a_save_keeps_latest_and_resumes_bit_exact(tmp_path, reference, layout, rank, point):
    """The rank dies at a chosen point of saving step_3: `shards` = its files are written into
    step_3.tmp, `renamed` = the complete step_3 is in place but `latest` has not moved."""
    out, tag = tmp_path / "run", f"save-{layout}-{point}-{tmp_path.name}"
    checkpoints = out / "checkpoints"
    proc = _start("sft", out, layout, TARGET["sft"], tag, **{KILL_HOOK: f"{rank}:step_3:{point}"})
    try:
        seen = lambda: (checkpoints / "step_3.tmp").exists() or (checkpoints / "step_3").exists()  # noqa: E731
        wait_for(seen, 240, "the save of step_3 to start", proc)
        _assert_ended_clean(proc, tag, time.monotonic(), rank=rank)
    finally:
        kill_all(tag)
    assert latest(out) == "step_2"  # the previous complete checkpoint
    assert (checkpoints / "step_2" / "trainer_state.json").is_file()
    if point == "shards":
        assert (checkpoints / "step_3.tmp" / "rng" / f"rank_0000{rank}.pt").is_file()  # written, then killed
        assert not (checkpoints / "step_3").exists()
    else:
        assert (checkpoints / "step_3" / "trainer_state.json").is_file() and not (checkpoints / "step_3.tmp").exists()
    stdout = _assert_resumes_bit_exact("sft", layout, out, reference("sft", layout), "step_2", tag)
    if point == "shards":
        assert "start-up: removed stale step_3.tmp" in stdout
    assert not list(checkpoints.glob("*.tmp")) and latest(out) == f"step_{TARGET['sft']}"

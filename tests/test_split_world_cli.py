"""`megatron-reft ppo` with a separate critic on ranks of its own (issue 12), run as a user
would: torchrun, 3 gloo processes, the tiny CPU config.

- 1 actor rank + 2 critic ranks (critic PP=2): N steps straight equal N/2 + resume + N/2 (every
  metric, every tensor of both roles' checkpoints, optimizer states included);
- the critic resumes at another layout (TP=2) from the same checkpoint;
- a killed critic rank and a hung one end the job, named, within the limits; and vice versa a
  killed actor rank (rank 0, the lead the critic serves) ends the critic ranks and the job.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from fault_utils import command, env, error_lines, kill_all, latest, metrics, run, tensors, \
    wait_for, wait_for_no_processes

SMALL = ["trainer.save_interval=1", "trainer.eval_interval=1000", "data.synthetic_train_items=64",
         "data.synthetic_eval_items=4", "ppo.rollout_batch_size=4", "trainer.micro_batch_size=2",
         "data.max_prompt_length=40", "data.max_total_length=64", "critic.mode=separate",
         "critic.lr=3e-3", "trainer.keep_last=3"]
CRITIC_PP2 = ["critic.world_size=2", "critic.pipeline_model_parallel_size=2"]
# Figures that measure the machine, not the training; and eval_accuracy (a run evaluates at its
# last step, so the interrupted half has one more).
TIMING = ("time", "tokens_per_s", "peak_memory", "critic_wait", "critic_overlap", "eval_accuracy")


def _ppo(out: Path, steps: int, *extra: str) -> None:
    proc = run(command("ppo", out, f"trainer.max_steps={steps}", *SMALL, *extra, nproc=3), timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _training_figures(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if not any(t in k for t in TIMING)} for m in metrics(run_dir)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("split") / "straight"
    _ppo(out, 2, *CRITIC_PP2)
    return out


def test_split_world_resumes_both_roles_exactly(straight, tmp_path):
    resumed = tmp_path / "resumed"
    _ppo(resumed, 1, *CRITIC_PP2)
    _ppo(resumed, 2, *CRITIC_PP2)
    figures = _training_figures(straight)
    assert [m["step"] for m in figures] == [1, 2] and figures[0]["value_loss"] > 0
    assert _training_figures(resumed) == figures
    for role in ("", "critic"):  # the policy's checkpoint, then the critic's inside it
        a = tensors(straight / "checkpoints" / "step_2" / role)
        b = tensors(resumed / "checkpoints" / "step_2" / role)
        assert sorted(a) == sorted(b) and any("optimizer" in k for k in a)
        assert not [k for k in a if not torch.equal(a[k], b[k])], role
    critic_keys = tensors(straight / "checkpoints" / "step_2" / "critic")
    assert any("value_head" in k for k in critic_keys)
    assert (straight / "checkpoints" / "step_2" / "critic" / "rng" / "rank_00001.pt").is_file()


def test_critic_resumes_at_another_layout(straight, tmp_path):
    """The critic saved at PP=2 resumes at TP=2: the second step's figures match (to float
    rounding: TP sums in another order)."""
    other = tmp_path / "critic_tp2"
    _ppo(other, 2, f"trainer.resume={straight / 'checkpoints' / 'step_1'}", "critic.world_size=2",
         "critic.tensor_model_parallel_size=2")
    got, want = _training_figures(other), _training_figures(straight)
    assert [m["step"] for m in got] == [2]
    for key in ("value_loss", "policy_loss", "reward_mean", "explained_variance", "value_clip_fraction"):
        assert got[0][key] == pytest.approx(want[1][key], rel=1e-3, abs=1e-5), key


# ---------------------------------------------------------------- failures
def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    for pid in children.read_text().split() if children.is_file() else []:
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
        except OSError:
            continue
    return None


def _start(out: Path, tag: str, *extra: str, **environ):
    import subprocess

    from fault_utils import REPO

    return subprocess.Popen(command("ppo", out, "trainer.max_steps=50", *SMALL, "critic.world_size=1", *extra,
                                    nproc=3),
                            cwd=REPO, env=env(tag, **environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_killed_critic_rank_ends_the_job_naming_it(tmp_path):
    out, tag = tmp_path / "kill", "splitkill-" + tmp_path.name
    job = _start(out, tag)  # actor ranks 0-1 (DP=2), critic rank 2
    try:
        wait_for(lambda: latest(out) is not None, 240, "a first checkpoint", job)
        victim = _rank_pid(job.pid, 2)
        assert victim is not None
        import os

        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = job.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60 and job.returncode != 0
        # our line when the actor saw it first ("critic lead rank 2 is gone ..."), else torchrun's
        assert "critic lead rank 2" in err or "rank      : 2" in err, err[-3000:]
        assert not wait_for_no_processes(tag, 30)
    finally:
        kill_all(tag)


def test_hung_critic_rank_ends_the_job_within_the_hang_timeout(tmp_path):
    out, tag = tmp_path / "hang", "splithang-" + tmp_path.name
    job = _start(out, tag, "trainer.hang_timeout_s=8", MEGATRON_REFT_TEST_HANG="2:critic update")
    try:
        _, err = job.communicate(timeout=240)
        assert job.returncode != 0
        hang = [line for line in error_lines(err) if line.startswith("hang:")]
        assert hang and hang[0].startswith("hang: rank 2 made no progress for"), err[-3000:]
        assert "phase 'critic update'" in hang[0]
        stuck_for = float(hang[0].split(" for ")[1].split(" s ")[0])
        assert 8 <= stuck_for < 12  # within the hang timeout (plus the watchdog's poll)
        assert not wait_for_no_processes(tag, 30)
    finally:
        kill_all(tag)


def test_killed_actor_lead_ends_the_critic_ranks_naming_it(tmp_path):
    """Vice versa: kill -9 of the actor's lead rank 0 (the one rank the critic talks to) ends the
    critic rank and the job within 60 s, the dead rank named, no process left behind."""
    import os

    out, tag = tmp_path / "kill_actor", "splitkillactor-" + tmp_path.name
    job = _start(out, tag)  # actor ranks 0-1 (DP=2), critic rank 2
    try:
        wait_for(lambda: latest(out) is not None, 240, "a first checkpoint", job)
        critic = _rank_pid(job.pid, 2)
        victim = _rank_pid(job.pid, 0)
        assert victim is not None and critic is not None
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = job.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60 and job.returncode != 0
        # the critic's line when it saw it first ("actor lead rank 0 is gone ..."), else torchrun's
        assert "actor lead rank 0" in err or "rank      : 0" in err, err[-3000:]
        assert not wait_for_no_processes(tag, 30)  # the critic rank included
        assert not Path(f"/proc/{critic}/cmdline").is_file() or not Path(f"/proc/{critic}/cmdline").read_bytes()
    finally:
        kill_all(tag)

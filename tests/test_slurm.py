"""The sbatch scripts on a real one-node Slurm cluster, on CPU (issue 6).

The cluster comes from tests/slurm_cluster.py (installed with apt when missing; the tests skip
with the reason when that is impossible). Jobs run the tiny CPU recipe with 2 tasks, the
scripts' GPU defaults overridden on the sbatch command line exactly as a user would:

    sbatch --wait --ntasks-per-node=2 --gpus-per-node=0 slurm/sft.sh configs/tiny_cpu.yaml ...

- SFT and PPO run to completion; the run directory holds checkpoints, metrics, the resolved
  config and one log per rank; the launcher log shows the layout and the memory plan.
- eval.sh scores a run directory's latest checkpoint.
- A bad config ends the job in the pre-flight step, before any rank starts.
- Preemption/time limit (SIGUSR1 to the batch script) requeues the job under the same job id,
  which resumes from its latest checkpoint; killing one rank then ends the job within seconds
  with a message naming the rank; resubmitting with the same RUN_DIR resumes and finishes with
  exactly the metrics and data position of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import slurm_cluster
from fault_utils import TAG_VAR, tagged_pids, wait_for_no_processes
from fault_utils import tensors as _tensors

REPO = Path(__file__).resolve().parents[1]
CPU = ["--ntasks-per-node=2", "--gpus-per-node=0"]
# Short PPO from the SFT checkpoint: responses of at most 32 tokens, a 2-item eval at the end,
# a checkpoint after every step (so the fault test can interrupt between checkpoints).
PPO_STEPS = 5
PPO_ARGS = [f"trainer.max_steps={PPO_STEPS}", "trainer.save_interval=1", "data.max_eval_items=2",
            "data.max_total_length=128", "trainer.progress_bar=false"]
FAIL_FAST_S = 60  # a killed rank must end the job within this many seconds


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    try:
        env = slurm_cluster.ensure_cluster()
    except slurm_cluster.ClusterUnavailable as err:
        pytest.skip(f"no local Slurm cluster: {err}")
    runs = tmp_path_factory.mktemp("slurm_runs")
    return {**env, "RUNS_ROOT": str(runs), "OMP_NUM_THREADS": "1"}


def runs_root(env) -> Path:
    return Path(env["RUNS_ROOT"])


def sbatch(env, args: list[str], *, wait: bool = False, extra_env: dict | None = None,
           timeout: float = 600) -> tuple[int, int]:
    """Submit from the repository root; (job id, sbatch's exit status)."""
    out = str(runs_root(env) / "slurm-%j.out")
    cmd = ["sbatch", "--parsable", "-o", out] + (["--wait"] if wait else []) + args
    result = subprocess.run(cmd, cwd=REPO, env={**env, **(extra_env or {})}, capture_output=True,
                            text=True, timeout=timeout)
    first_line = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    assert first_line.split(";")[0].isdigit(), f"sbatch failed: {result.stderr}"
    return int(first_line.split(";")[0]), result.returncode


def job_field(env, job: int, name: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", str(job)], env=env, capture_output=True,
                          text=True, timeout=30).stdout
    for token in text.split():
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return ""


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_finished(env, job: int, timeout: float = 600) -> str:
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    return wait_until(lambda: (s := job_field(env, job, "JobState")) in done and s, timeout,
                      f"job {job} to finish", poll=0.5)


def run_job(env, args: list[str], extra_env: dict | None = None) -> tuple[int, int]:
    """Like `sbatch --wait`, without its polling delay (it backs off to tens of seconds)."""
    job, _ = sbatch(env, args, extra_env=extra_env)
    wait_finished(env, job)
    return job, int(job_field(env, job, "ExitCode").split(":")[0] or 1)


def batch_log(env, job: int) -> str:
    path = runs_root(env) / f"slurm-{job}.out"
    return path.read_text() if path.is_file() else ""


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def latest(run: Path) -> str:
    pointer = run / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else ""


def step_of(name: str) -> int:
    return int(name.split("_")[1]) if name.startswith("step_") else -1


def rank_python_pid(env, job: int, rank: int) -> int | None:
    """The Python process of global rank `rank` (the child of its task wrapper)."""
    listing = subprocess.run(["scontrol", "listpids", str(job)], env=env, capture_output=True,
                             text=True, timeout=30).stdout.splitlines()[1:]
    wrappers = [int(f[0]) for f in map(str.split, listing) if len(f) == 5 and f[2] != "batch" and f[4] == str(rank)]
    for wrapper in wrappers:
        children = subprocess.run(["pgrep", "-P", str(wrapper)], capture_output=True, text=True).stdout.split()
        for child in map(int, children):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"megatron_reft.cli" in cmdline:
                return child
    return None


# ---------------------------------------------------------------- jobs shared by the tests
@pytest.fixture(scope="module")
def sft_job(slurm_env):
    job, rc = sbatch(slurm_env, CPU + ["slurm/sft.sh", "configs/tiny_cpu.yaml", "trainer.max_steps=4"], wait=True)
    return job, rc, runs_root(slurm_env) / f"tiny_cpu-sft-{job}"


@pytest.fixture(scope="module")
def ppo_job(slurm_env, sft_job):
    """The uninterrupted PPO run the fault test is compared against."""
    _, _, sft_run = sft_job
    job, rc = run_job(slurm_env, CPU + ["slurm/reft_ppo.sh", "configs/tiny_cpu.yaml",
                                        f"model.load={sft_run}"] + PPO_ARGS)
    return job, rc, runs_root(slurm_env) / f"tiny_cpu-ppo-{job}"


# ---------------------------------------------------------------- tests
def test_sft_job_runs_to_completion_on_cpu(slurm_env, sft_job):
    job, rc, run = sft_job
    log = batch_log(slurm_env, job)
    assert rc == 0, log[-3000:]
    assert job_field(slurm_env, job, "JobState") == "COMPLETED"
    assert latest(run) == "step_4"
    ckpt = run / "checkpoints" / "step_4"
    assert (ckpt / "model.yaml").is_file() and (ckpt / "trainer_state.json").is_file()
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]
    assert f"output_dir: {run}" in (run / "config.yaml").read_text()  # the resolved config
    logs = run / "logs" / f"job{job}.0"
    assert (logs / "rank_0.log").is_file() and (logs / "rank_1.log").is_file()
    assert "layout: world=2 TP=1 PP=1 DP=2 on CPU (gloo) (launcher: slurm)" in (logs / "rank_0.log").read_text()
    for expected in ("device: CPU", "MASTER_ADDR=", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                     "memory plan: sft", "TP=1 PP=1 DP=2", f"done: {run}"):
        assert expected in log, expected
    assert "memory plan: sft" in (logs / "launcher.log").read_text()  # the run dir keeps the launcher's log


def test_ppo_job_runs_to_completion_on_cpu(slurm_env, sft_job, ppo_job):
    job, rc, run = ppo_job
    assert rc == 0, batch_log(slurm_env, job)[-3000:]
    sft_ckpt = sft_job[2] / "checkpoints" / "step_4"
    assert f"model.load: {sft_job[2]} -> {sft_ckpt}" in batch_log(slurm_env, job)  # run dir → its checkpoint
    assert latest(run) == f"step_{PPO_STEPS}"
    rows = metrics(run)
    assert [m["step"] for m in rows] == list(range(1, PPO_STEPS + 1))
    assert all("reward_mean" in m and "kl" in m for m in rows)
    assert rows[-1].get("eval_accuracy") is not None
    assert "memory plan: ppo" in batch_log(slurm_env, job)


def test_eval_job_scores_the_latest_checkpoint_of_a_run(slurm_env, ppo_job):
    _, _, ppo_run = ppo_job
    job, rc = run_job(slurm_env, CPU + ["slurm/eval.sh", "configs/tiny_cpu.yaml", "--ckpt", str(ppo_run),
                                        "data.max_eval_items=4", "trainer.progress_bar=false"])
    assert rc == 0, batch_log(slurm_env, job)[-3000:]
    assert f"checkpoint: {ppo_run / 'checkpoints' / f'step_{PPO_STEPS}'}" in batch_log(slurm_env, job)
    predictions = (runs_root(slurm_env) / f"tiny_cpu-eval-{job}" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4 and all("correct" in json.loads(p) for p in predictions)


def test_bad_config_ends_the_job_before_ranks_start(slurm_env):
    job, rc = run_job(slurm_env, CPU + ["slurm/sft.sh", "configs/tiny_cpu.yaml",
                                        "parallel.tensor_model_parallel_size=3"])
    log = batch_log(slurm_env, job)
    assert rc != 0 and job_field(slurm_env, job, "JobState") == "FAILED"
    assert "parallel.tensor_model_parallel_size: 3 does not divide" in log
    assert "pre-flight failed" in log and "starting 2 rank(s)" not in log


def test_requeue_fail_fast_and_resume(slurm_env, sft_job, ppo_job):
    """Preempt → requeue → resume; kill a rank → fast failure; resubmit → resume → identical."""
    reference = ppo_job[2]
    run = runs_root(slurm_env) / "fault"
    args = CPU + ["slurm/reft_ppo.sh", "configs/tiny_cpu.yaml", f"model.load={sft_job[2]}"] + PPO_ARGS
    tag = f"slurm-requeue-{run.parent.name}"  # every process of this job carries it (issue 11)
    job, _ = sbatch(slurm_env, args, extra_env={"RUN_DIR": str(run), TAG_VAR: tag})

    # 1. SIGUSR1 (what --signal=B:USR1@300 sends before the time limit) → requeued, same job id.
    wait_until(lambda: step_of(latest(run)) >= 1, 300, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=slurm_env, check=True)
    wait_until(lambda: job_field(slurm_env, job, "Restarts") == "1", 60, "the requeue")
    resumed_log = run / "logs" / f"job{job}.1" / "rank_0.log"
    wait_until(lambda: resumed_log.is_file() and "resumed from" in resumed_log.read_text(), 300,
               "the requeued job to resume")

    # 2. Kill rank 1 of the requeued attempt after it wrote a checkpoint of its own.
    first = step_of(latest(run))
    wait_until(lambda: step_of(latest(run)) > first, 300, "a checkpoint after the resume")
    pid = wait_until(lambda: rank_python_pid(slurm_env, job, 1), 30, "rank 1's process")
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    state = wait_finished(slurm_env, job, timeout=FAIL_FAST_S + 30)
    took = time.monotonic() - killed_at
    assert state == "FAILED" and took < FAIL_FAST_S, (state, took)
    assert not wait_for_no_processes(tag, FAIL_FAST_S - took), f"left behind: {tagged_pids(tag)}"
    log = batch_log(slurm_env, job)
    assert "FAILED: the ranks ended with status" in log
    assert "rank 1 (node" in log and "killed by SIGKILL" in log
    interrupted_at = step_of(latest(run))
    assert interrupted_at < PPO_STEPS, "the job finished before the kill: nothing was tested"

    # 3. Resubmit with the same run directory: resumes from the last checkpoint and ends exactly
    #    where an uninterrupted run ends (same data position, same metrics step by step).
    job2, rc = run_job(slurm_env, args, extra_env={"RUN_DIR": str(run)})
    assert rc == 0, batch_log(slurm_env, job2)[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{interrupted_at}'} at step {interrupted_at}" in \
        (run / "logs" / f"job{job2}.0" / "rank_0.log").read_text()
    final = f"step_{PPO_STEPS}"
    state = json.loads((run / "checkpoints" / final / "trainer_state.json").read_text())
    expected = json.loads((reference / "checkpoints" / final / "trainer_state.json").read_text())
    assert state["sampler"] == expected["sampler"]
    got, want = metrics(run), metrics(reference)
    assert [m["step"] for m in got] == list(range(1, PPO_STEPS + 1))
    for a, b in zip(got, want):
        for key in ("reward_mean", "response_length", "kl", "policy_loss", "value_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)



def test_baseline_scripts_run_on_cpu(slurm_env, sft_job):
    """online_st.sh, offline_st_data.sh and train_rm.sh (issue 13) from the SFT run, 2 ranks each."""
    sft_run, root = sft_job[2], runs_root(slurm_env)
    sft_ckpt = sft_run / "checkpoints" / "step_4"
    job, rc = run_job(slurm_env, CPU + ["slurm/online_st.sh", "configs/tiny_cpu.yaml", f"model.load={sft_run}",
                                        "trainer.max_steps=2", "ppo.ppo_epochs=1"] + PPO_ARGS[2:])
    assert rc == 0, batch_log(slurm_env, job)[-3000:]
    assert f"model.load: {sft_run} -> {sft_ckpt}" in batch_log(slurm_env, job)
    online = root / f"tiny_cpu-online-st-{job}"
    assert [m["step"] for m in metrics(online)] == [1, 2] and latest(online) == "step_2"
    assert "memory plan: ppo" in batch_log(slurm_env, job)

    small = ["data.synthetic_train_items=8", "trainer.progress_bar=false"]
    job, rc = run_job(slurm_env, CPU + ["slurm/offline_st_data.sh", "configs/tiny_cpu.yaml", "--samples", "2",
                                        "ppo.generation_micro_batch=8", "data.max_total_length=128"] + small,
                      extra_env={"CKPT": str(sft_run)})
    assert rc == 0, batch_log(slurm_env, job)[-3000:]
    data_run = root / f"tiny_cpu-offline-st-data-{job}"
    stored = [json.loads(line) for f in sorted((data_run / "train.jsonl.samples").glob("rank*.jsonl"))
              for line in f.read_text().splitlines()]
    assert sorted(x["id"] for x in stored) == sorted({x["id"] for x in stored}) and len(stored) == 8
    assert len(list((data_run / "train.jsonl.samples").glob("rank*.jsonl"))) == 2  # one file per DP rank

    job, rc = run_job(slurm_env, CPU + ["slurm/train_rm.sh", "configs/tiny_cpu.yaml", f"model.load={sft_run}",
                                        "--samples-dir", str(data_run / "train.jsonl.samples"), "trainer.epochs=1",
                                        "trainer.global_batch_size=8", "data.max_total_length=256"] + small)
    assert rc == 0, batch_log(slurm_env, job)[-3000:]
    rm_run = root / f"tiny_cpu-rm-{job}"
    assert [m["step"] for m in metrics(rm_run)] == [1, 2] and latest(rm_run) == "step_2"  # 16 samples / 8
    assert f"done: {rm_run}" in batch_log(slurm_env, job)


@pytest.mark.parametrize("victim", ["srun", "scancel"])
def test_killed_srun_or_cancelled_job_leaves_no_process(slurm_env, victim):
    """kill -9 of the job step's srun (the launcher) or `scancel` of the job: every process the
    job started (batch script, srun, ranks and their children) is gone within 60 s (issue 11).
    Processes are counted through an environment tag sbatch passes on to every task."""
    run = runs_root(slurm_env) / f"kill-{victim}"
    tag = f"slurm-{victim}-{runs_root(slurm_env).name}"
    job, _ = sbatch(slurm_env, CPU + ["slurm/sft.sh", "configs/tiny_cpu.yaml", "trainer.max_steps=100000",
                                      "trainer.save_interval=1", "trainer.progress_bar=false"],
                    extra_env={"RUN_DIR": str(run), TAG_VAR: tag})
    try:
        wait_until(lambda: step_of(latest(run)) >= 2, 300, "step_2 saved")
        ranks = [rank_python_pid(slurm_env, job, r) for r in (0, 1)]
        assert all(ranks) and set(ranks) <= set(tagged_pids(tag))  # the tag reaches the ranks
        killed_at = time.monotonic()
        if victim == "srun":
            sruns = [p for p in tagged_pids(tag) if _argv0(p).endswith("srun")]
            assert sruns, "no srun process found in the job"
            for pid in sruns:
                os.kill(pid, signal.SIGKILL)
        else:
            subprocess.run(["scancel", str(job)], env=slurm_env, check=True)
        state = wait_finished(slurm_env, job, timeout=FAIL_FAST_S + 30)
        left = wait_for_no_processes(tag, max(1.0, FAIL_FAST_S - (time.monotonic() - killed_at)))
        assert not left, f"left behind: {[(p, _argv0(p)) for p in left]}"
        assert time.monotonic() - killed_at < FAIL_FAST_S
        assert state == ("CANCELLED" if victim == "scancel" else "FAILED"), state
    finally:
        if job_field(slurm_env, job, "JobState") in ("RUNNING", "PENDING"):
            subprocess.run(["scancel", str(job)], env=slurm_env)
        for pid in tagged_pids(tag):
            os.kill(pid, signal.SIGKILL)


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def test_split_world_ppo_job_on_three_tasks(slurm_env, sft_job):
    """The separate critic on a rank of its own from one allocation (issue 12): 3 tasks, actor ranks
    0-1 (DP=2), critic rank 2, 2 PPO steps (the test node declares 4 CPUs for this: slurm_cluster.py)."""
    sft_run = sft_job[2]
    job, rc = run_job(slurm_env, ["--ntasks-per-node=3", "--gpus-per-node=0",
                                  "slurm/reft_ppo.sh", "configs/tiny_cpu.yaml", f"model.load={sft_run}",
                                  "critic.mode=separate", "critic.world_size=1", "trainer.max_steps=2"]
                      + PPO_ARGS[1:])
    log = batch_log(slurm_env, job)
    assert rc == 0, log[-3000:]
    run = runs_root(slurm_env) / f"tiny_cpu-ppo-{job}"
    assert latest(run) == "step_2" and [m["step"] for m in metrics(run)] == [1, 2]
    assert all(m["value_loss"] > 0 and "critic_update_time" in m for m in metrics(run))
    critic = run / "checkpoints" / "step_2" / "critic"
    assert critic.is_dir() and list((critic / "rng").glob("rank_*.pt")), sorted(critic.rglob("*"))[:20]
    assert any("value_head" in k for k in _tensors(critic))
    logs = run / "logs" / f"job{job}.0"
    assert sorted(p.name for p in logs.glob("rank_*.log")) == ["rank_0.log", "rank_1.log", "rank_2.log"]
    assert ("layout: world=3 = actor ranks 0-1 (TP=1 PP=1 DP=2) + critic ranks 2-2 (TP=1 PP=1 DP=1)"
            in (logs / "rank_0.log").read_text())
    assert "memory plan: ppo" in log and "starting 3 rank(s)" in log

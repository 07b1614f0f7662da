"""Fault injection on the tiny CPU config, through the CLI as a user runs it (issue 11,
docs/reliability.md). Every case asserts the outcome: exit code and time, the one error line,
what is on disk afterwards (latest finite, nothing written, a complete best), the processes
left (counted through an environment tag every child inherits) and the resumed run.
"""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fault_utils import (REPO, command, env, error_lines, kill_all, latest, metrics, run, sandbox_pids,
                         tensors, wait_for, wait_for_no_processes)

pytestmark = pytest.mark.timeout(600) if hasattr(pytest.mark, "timeout") else []


# ---------------------------------------------------------------- numerical guard
def test_huge_lr_skips_nonfinite_steps_then_stops_with_latest_finite(tmp_path):
    # 1e20: Adam moves every weight by ~lr in the first step, so the next forward overflows.
    # (1e6 no longer did: the RMSNorm's closed-form backward stays finite where autograd's
    # composite overflowed, and 20 steps at 1e6 trained without a non-finite value.)
    out = tmp_path / "nan"
    started = time.monotonic()
    proc = run(command("sft", out, "optim.lr=1e20", "trainer.max_steps=20", "trainer.save_interval=1",
                       "trainer.max_nonfinite_steps=3"))
    assert time.monotonic() - started < 60
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    rows = metrics(out)
    last = rows[-1]["step"]
    assert f"step {last}: 3 consecutive non-finite steps" in lines[0]
    assert "trainer.max_nonfinite_steps=3" in lines[0]
    assert f"last good checkpoint: {out / 'checkpoints' / latest(out)}" in lines[0]
    assert [r["skipped_step"] for r in rows[-3:]] == [1, 1, 1] and rows[-1]["nonfinite_steps"] == 3
    assert all(r["skipped_step"] == 0 for r in rows[:-3])
    state = tensors(out / "checkpoints" / latest(out))
    assert state and all(torch.isfinite(t).all() for t in state.values())


# ---------------------------------------------------------------- storage
@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({proc.stderr.strip()}); needs root")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_disk_full_reports_enospc_keeps_latest_and_rerun_resumes(small_tmpfs):
    out = small_tmpfs / "run"
    cmd = command("sft", out, "trainer.max_steps=4", "trainer.save_interval=1", "trainer.keep_last=1")
    proc = run(cmd)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "ENOSPC" in lines[0] and "No space left on device" in lines[0] and str(out) in lines[0]
    kept = latest(out)
    assert kept is not None and f"latest is still {kept}" in lines[0]
    assert (out / "checkpoints" / kept / "trainer_state.json").is_file()
    assert not list((out / "checkpoints").glob("*.tmp"))  # the partial write was removed
    # a leftover of a killed save, then more space: the rerun cleans up and resumes
    (out / "checkpoints" / "step_99.tmp").mkdir()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed stale step_99.tmp" in proc.stdout
    assert f"at step {kept.split('_')[1]}" in proc.stdout
    assert latest(out) == "step_4" and [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


def _fill(path: Path) -> None:
    """Write zeros to `path` until the filesystem is full (ENOSPC)."""
    with open(path, "ab", buffering=0) as f:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == 28, err


def _one_line_enospc(proc, path: Path) -> str:
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0] == f"error: {path}: [Errno 28 ENOSPC] No space left on device", lines[0]
    return lines[0]


def test_disk_full_writing_config_or_metrics_is_one_line_and_the_rerun_resumes(small_tmpfs):
    """Outside a save: config.yaml at start-up (one 4 KiB page free: enough for job.lock, not
    for config.yaml), then metrics.jsonl mid-run (the disk filled while the job trains)."""
    out = small_tmpfs / "run"
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_tmpfs)], check=True)
    base = ("trainer.keep_last=1", "trainer.eval_accuracy=false")
    assert run(command("sft", out, "trainer.max_steps=2", "trainer.save_interval=1", *base)).returncode == 0
    config_before, metrics_before = (out / "config.yaml").read_bytes(), (out / "metrics.jsonl").read_bytes()
    spare, filler = small_tmpfs / "spare", small_tmpfs / "filler"
    spare.write_bytes(b"\0" * 4096)
    _fill(filler)
    spare.unlink()
    proc = run(command("sft", out, "trainer.max_steps=3", *base))  # max_steps changed: config.yaml is rewritten
    _one_line_enospc(proc, out / "config.yaml")
    assert (out / "config.yaml").read_bytes() == config_before  # not half-written
    assert (out / "metrics.jsonl").read_bytes() == metrics_before
    assert not list(out.glob("*.tmp")) and not (out / "job.lock").exists()

    filler.unlink()
    tag = "metricsfull-" + small_tmpfs.parent.name
    job = subprocess.Popen(command("sft", out, "trainer.max_steps=100000", "trainer.save_interval=100000", *base),
                           cwd=REPO, env=env(tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(metrics(out)) >= 4, 180, "step 4 logged", job)
        _fill(filler)  # the next metrics line that needs a new page fails
        _, err = job.communicate(timeout=180)
    finally:
        kill_all(tag)
    _one_line_enospc(subprocess.CompletedProcess(job.args, job.returncode, "", err), out / "metrics.jsonl")
    logged = metrics(out)  # every line whole (json.loads of each)
    assert len(logged) >= 4 and (out / "metrics.jsonl").read_text().endswith("\n")
    assert latest(out) == "step_2"

    filler.unlink()  # space again: resumes from step_2, the lines after it are logged anew
    proc = run(command("sft", out, "trainer.max_steps=3", *base))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in proc.stdout
    assert [m["step"] for m in metrics(out)] == [1, 2, 3] and latest(out) == "step_3"

    # the run report (`megatron-reft report`) onto a full disk: one line, the previous report whole
    import sys

    report = [sys.executable, "-m", "megatron_reft.cli", "report", str(out), "--out", str(small_tmpfs / "report")]
    assert run(report).returncode == 0
    before = (small_tmpfs / "report" / "report.md").read_bytes()
    for png in (small_tmpfs / "report").glob("*.png"):
        png.unlink()  # rewritten first: the disk is full when it is
    _fill(filler)
    proc = run(report)
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert "[Errno 28 ENOSPC] No space left on device" in proc.stderr and str(small_tmpfs / "report") in proc.stderr
    assert (small_tmpfs / "report" / "report.md").read_bytes() == before
    assert not list((small_tmpfs / "report").glob("*.tmp"))


# ---------------------------------------------------------------- one job per run directory
def test_second_job_on_a_run_directory_refuses_and_a_dead_holder_is_stale(tmp_path):
    out, tag = tmp_path / "shared", "lock-" + tmp_path.name
    first = subprocess.Popen(command("sft", out, "trainer.max_steps=100000", "trainer.save_interval=100000"),
                             cwd=REPO, env=env(tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(metrics(out)) >= 1, 120, "the first job's first step", first)
        config_before = (out / "config.yaml").read_bytes()
        second = run(command("sft", out, "trainer.max_steps=2"))
        assert second.returncode == 2, second.stderr[-3000:]
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and f"in use by sft job PID {first.pid}" in lines[0], second.stderr[-2000:]
        assert (out / "config.yaml").read_bytes() == config_before
        first.kill()  # kill -9: the lock file stays, the kernel lock goes
        first.wait(30)
        assert (out / "job.lock").is_file()
        third = run(command("sft", out, "trainer.max_steps=1"))
        assert third.returncode == 0, third.stderr[-3000:]
        assert not (out / "job.lock").exists()  # released at exit
    finally:
        first.kill()
        kill_all(tag)


# ---------------------------------------------------------------- resume safety, user errors
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    proc = run(command("sft", out, "trainer.max_steps=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_refused_untouched(proc, run_dir: Path, *needles: str):
    snapshot = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    detail = proc.stderr.split(lines[0], 1)[1].strip().splitlines()
    message = (detail[0] if lines[0] == "config error:" and detail else lines[0])
    for needle in needles:
        assert needle in message, message
    return snapshot


def test_shape_change_on_resume_is_refused_in_one_line_writing_nothing(trained):
    # more refusals (batch size, seed, data) are unit-tested in test_reliability.py
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    proc = run(command("sft", trained, "trainer.max_steps=3", "model.hidden_size=128"))
    _assert_refused_untouched(proc, trained, "model.hidden_size: cannot change", "64 -> 128")
    after = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    assert after == before  # config.yaml, checkpoints, metrics: nothing written


def test_resumable_changes_are_logged(trained, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace(str(trained), str(copy)))
    proc = run(command("sft", copy, "trainer.max_steps=3", "trainer.micro_batch_size=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume: changed since the run started: trainer.max_steps 2 -> 3, trainer.micro_batch_size 4 -> 2" \
        in proc.stdout
    assert latest(copy) == "step_3"


def test_broken_tokenizer_exits_2_in_one_line_writing_nothing(tmp_path):
    # non-UTF-8 and non-list data files take the same path (runtime._user_input); their
    # messages are unit-tested in test_reliability.py
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{ not json")
    out = tmp_path / "out"
    proc = run(command("sft", out, "trainer.max_steps=1", f"data.tokenizer={tmp_path / 'tok'}",
                       f"data.train_file={REPO / 'tests' / 'fault_utils.py'}"))
    _assert_refused_untouched(proc, tmp_path, "data.tokenizer:", str(tmp_path / "tok"))
    assert not out.exists()  # nothing written before validation passed


# ---------------------------------------------------------------- kills and hangs
def _start(cmd, tag, **extra):
    return subprocess.Popen(cmd, cwd=REPO, env=env(tag, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _rank_pids(launcher_pid: int) -> list[int]:
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    return sorted(int(p) for p in children.read_text().split()) if children.is_file() else []


@pytest.mark.parametrize("victim", ["rank1", "launcher"])
def test_kill_9_under_torchrun_leaves_no_process_and_resumes_bit_exact(tmp_path, victim):
    out, tag = tmp_path / "tp2", f"kill-{victim}-{tmp_path.name}"
    tp2 = ("parallel.tensor_model_parallel_size=2", "trainer.save_interval=1")
    job = _start(command("sft", out, "trainer.max_steps=200", *tp2, nproc=2), tag)
    try:
        wait_for(lambda: latest(out) in ("step_2", "step_3", "step_4"), 180, "step_2 saved", job)
        ranks = _rank_pids(job.pid)
        assert len(ranks) == 2
        killed_at = time.monotonic()
        import os

        os.kill(job.pid if victim == "launcher" else ranks[1], signal.SIGKILL)
        if victim == "rank1":
            job.wait(60)
            assert job.returncode != 0
        left = wait_for_no_processes(tag, 60 - (time.monotonic() - killed_at))
        assert not left, f"left behind: {left}"
        assert time.monotonic() - killed_at < 60
        if victim == "rank1":
            assert "rank      : 1" in job.stderr.read()  # torchrun names the dead rank
    finally:
        kill_all(tag)
    if victim == "launcher":
        return  # the resume after a kill is checked once, below
    resumed_from = int(latest(out).split("_")[1])
    reference = tmp_path / "reference"
    target = resumed_from + 1
    procs = [_start(command("sft", out, f"trainer.max_steps={target}", *tp2, nproc=2), tag + "r"),
             _start(command("sft", reference, f"trainer.max_steps={target}", *tp2, nproc=2), tag + "s")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    a, b = tensors(out / "checkpoints" / f"step_{target}"), tensors(reference / "checkpoints" / f"step_{target}")
    assert sorted(a) == sorted(b)
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_hang_in_a_rank_exits_within_timeout_naming_rank_and_phase(tmp_path):
    out, tag = tmp_path / "hang", "hang-" + tmp_path.name
    job = _start(command("sft", out, "trainer.max_steps=50", "trainer.hang_timeout_s=8",
                         "parallel.pipeline_model_parallel_size=2", nproc=2), tag,
                 MEGATRON_REFT_TEST_HANG="1:update")
    try:
        _, err = job.communicate(timeout=180)
        assert job.returncode != 0
        hang = [line for line in err.splitlines() if line.startswith("hang:")]
        assert hang and hang[0].startswith("hang: rank 1 made no progress for") and "phase 'update'" in hang[0], err[-3000:]
        assert "waiting for other ranks" not in hang[0]  # rank 0, blocked in the pipeline send/receive, waits
        assert not wait_for_no_processes(tag, 30)
    finally:
        kill_all(tag)


def test_ppo_hang_is_named_and_sandbox_workers_end_with_the_rank(tmp_path):
    """P-CoT, so programs run in the reward sandbox: its workers must not outlive the rank."""
    out, tag = tmp_path / "ppo", "ppohang-" + tmp_path.name
    started = time.monotonic()
    job = _start(command("ppo", out, "trainer.max_steps=2", "trainer.hang_timeout_s=6", "data.cot_type=pcot",
                         "data.synthetic_train_items=32", "data.synthetic_eval_items=4",
                         "ppo.rollout_batch_size=4", "data.max_prompt_length=96", "data.max_total_length=112"),
                 tag, MEGATRON_REFT_TEST_HANG="0:logprobs")
    try:
        workers_seen = 0
        while job.poll() is None and time.monotonic() - started < 180:
            workers_seen = max(workers_seen, len(sandbox_pids()))
            time.sleep(0.3)
        _, err = job.communicate(timeout=10)
        assert job.returncode == 3 and time.monotonic() - started < 120, err[-3000:]
        lines = error_lines(err)
        assert len(lines) == 1 and lines[0].startswith("hang: rank 0 made no progress") and \
            "phase 'logprobs'" in lines[0], err[-3000:]
        assert workers_seen > 0  # the sandbox was running when the rank hung
        assert not wait_for_no_processes(tag, 20)
        wait_for(lambda: not sandbox_pids(), 20, "sandbox workers to exit")
    finally:
        kill_all(tag)

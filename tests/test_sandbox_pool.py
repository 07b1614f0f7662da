"""The pool's own robustness: dead, stuck and retired workers are replaced and the caller
always gets an answer in bounded time; heavy modules; async scoring; non-root trainers."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_reft.reward import RewardConfig, RewardScorer
from megatron_reft.reward.sandbox.pool import SandboxConfig, SandboxPool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")
REPO = Path(__file__).resolve().parents[1]
GOOD = "def solution():\n    return 6 * 7"
LOOP = "def solution():\n    while True:\n        pass"


def zygote_of(worker):
    """The launcher's only child (the zygote, PID 1 of the worker's namespaces)."""
    children = psutil.Process(worker.proc.pid).children()
    return children[0] if children else psutil.Process(worker.proc.pid)


def test_killed_worker_is_replaced_mid_batch():
    with SandboxPool(SandboxConfig(num_workers=1, timeout_s=1.0)) as pool:
        old = pool._workers[0]
        pid = old.proc.pid
        signal_after = time.monotonic() + 0.3

        original_pump = pool._pump

        def pump_then_kill(wait_s, on_result):  # kill the worker while programs are running
            if time.monotonic() > signal_after and old.proc.poll() is None:
                os.kill(pid, signal.SIGKILL)
            original_pump(wait_s, on_result)

        pool._pump = pump_then_kill
        start = time.monotonic()
        results = pool.run([LOOP] * 4)
        assert time.monotonic() - start < 1.0 + pool.config.grace_s
        assert [r.status for r in results] == ["killed"] * 4
        pool._pump = original_pump
        assert pool._workers[0] is not old
        assert [r.value for r in pool.run([GOOD] * 3)] == [42.0] * 3


def test_stuck_worker_misses_its_deadline_and_is_replaced():
    config = SandboxConfig(num_workers=1, timeout_s=0.5, grace_s=1.0)
    with SandboxPool(config) as pool:
        old = pool._workers[0]
        zygote = zygote_of(old)
        zygote.suspend()  # SIGSTOP: the worker accepts requests but never answers
        start = time.monotonic()
        results = pool.run([GOOD, GOOD])
        elapsed = time.monotonic() - start
        assert [r.status for r in results] == ["killed", "killed"]
        assert elapsed < config.timeout_s + config.grace_s + 1.0, elapsed
        assert pool._workers[0] is not old
        assert [r.value for r in pool.run([GOOD])] == [42.0]
        assert not zygote.is_running() or zygote.status() == psutil.STATUS_ZOMBIE


def test_workers_are_retired_after_max_programs():
    with SandboxPool(SandboxConfig(num_workers=1, max_programs_per_worker=3)) as pool:
        first = pool._workers[0].proc.pid
        results = pool.run([f"def solution():\n    return {i}" for i in range(10)])
        assert [r.value for r in results] == [float(i) for i in range(10)]
        assert pool._workers[0].proc.pid != first
        assert psutil.pid_exists(first) is False or psutil.Process(first).status() == "zombie"


def test_heavy_modules_go_to_their_own_worker():
    program = ("def solution():\n    x = sympy.Symbol('x')\n"
               "    return sympy.solve(2 * x - 7, x)[0]")
    with SandboxPool(SandboxConfig(num_workers=1)) as pool:
        results = pool.run([program, GOOD, "def solution():\n    import numpy as np\n"
                                            "    return np.arange(5).sum()"])
        groups = sorted(w.group for w in pool._workers)
    if results[0].status == "error:NameError":
        pytest.skip("sympy is not installed")
    assert [r.value for r in results] == [3.5, 42.0, 10.0]
    assert groups == ["heavy", "light"]


def test_score_async_returns_a_future_of_the_same_results():
    with RewardScorer(RewardConfig(cot_type="pcot", num_workers=1)) as scorer:
        future = scorer.score_async([GOOD, "def solution():\n    return 41"], ["42", "42"],
                                    ["number", "number"])
        results = future.result(timeout=30)
    assert [r.reward for r in results] == [1.0, 0.1]
    assert [r.extracted for r in results] == ["42", "41"]


def test_bad_program_inputs_do_not_reach_the_workers():
    with SandboxPool(SandboxConfig(num_workers=1, max_program_chars=100)) as pool:
        results = pool.run(["", "   ", "x" * 101, None, GOOD])
    assert [r.status for r in results] == ["error:EmptyProgram"] * 2 + [
        "error:ProgramTooLong", "error:EmptyProgram", "ok"]


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                    or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root, setpriv and a system python3 to run as another user")
def test_unprivileged_trainer_gets_a_user_namespace_sandbox():
    """A non-root trainer (as on most clusters): user+pid+net namespaces instead of setuid."""
    check = (f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from megatron_reft.reward.sandbox.pool import SandboxConfig, SandboxPool
with SandboxPool(SandboxConfig(num_workers=1, timeout_s=1.0)) as pool:
    results = pool.run([{GOOD!r}, {LOOP!r},
                        "def solution():\\n    open('/tmp/reft_unpriv_marker', 'w')",
                        "def solution():\\n    import os\\n    os.kill(os.getppid(), 9)",
                        "def solution():\\n    import resource\\n"
                        "    resource.prlimit(1, resource.RLIMIT_CPU, (0, 0))"])
    print(json.dumps({{"statuses": [r.status for r in results], "ns": pool.isolation["namespaces"],
                      "summary": pool.isolation_summary}}))
""")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           SYSTEM_PYTHON, "-c", check], capture_output=True, text=True,
                          timeout=60, cwd="/")
    if proc.returncode != 0 and "user namespace" in proc.stderr:
        pytest.skip("user namespaces are disabled here")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert report["statuses"] == ["ok", "timeout"] + ["error:PermissionError"] * 3
    assert "user" in report["ns"] and "net" in report["ns"]
    assert not os.path.exists("/tmp/reft_unpriv_marker")

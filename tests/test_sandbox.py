"""Hostile programs: each must finish within its time limit with reward 0, and leave the
machine as it was - no files anywhere writable, no processes behind, the trainer (this test
process) and the sandbox workers alive."""
import os
import socket
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from megatron_reft.reward import RewardConfig, RewardScorer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")

TIMEOUT_S = 2.0  # the default; shorter ones make load spikes on a shared CI box look like timeouts
MARKER = f"reft_sandbox_marker_{uuid.uuid4().hex[:12]}"
WRITABLE_DIRS = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path.home(), Path.cwd(),
                 Path(__file__).resolve().parent]
DATA_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwp_reft" / "svamp_nl.json"


def program(body: str) -> str:
    return "def solution():\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ")


def hostile_programs(port: int) -> dict:
    """name -> program. Each would return 42 (the gold answer below) only if its attack worked."""
    files = {f"write_{i}": program(f"""
        with open({str(d / MARKER)!r}, "w") as f:
            f.write("escaped")
        return 42""") for i, d in enumerate(WRITABLE_DIRS)}
    return {
        **files,
        "write_relative": program(f"open({MARKER!r}, 'w').write('x')\nreturn 42"),
        "mkdir_tmp": program(f"import os\nos.mkdir('/tmp/{MARKER}_dir')\nreturn 42"),
        "infinite_loop": program("while True:\n    pass"),
        "sleep_forever": program("import time\ntime.sleep(3600)\nreturn 42"),
        "recursion": program("def f(n):\n    return f(n + 1) + 1\nreturn f(0)"),
        "deep_recursion": program(
            "import sys\nsys.setrecursionlimit(10 ** 7)\ndef f(n):\n    return f(n + 1) + 1\n"
            "return f(0)"),
        "memory_bomb": program("x = bytearray(64 * 1024 ** 3)\nreturn 42"),
        "memory_creep": program("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))"),
        "fork_bomb": program("import os\nwhile True:\n    os.fork()\nreturn 42"),
        "os_system": program(f"import os\nassert os.system('touch /tmp/{MARKER}_sys') == 0\n"
                             "return 42"),
        "posix_spawn": program(f"import os\nos.posix_spawn('/usr/bin/touch', "
                               f"['touch', '/tmp/{MARKER}_spawn'], {{}})\nreturn 42"),
        "execv": program(f"import os\nos.execv('/bin/sh', ['sh', '-c', 'touch /tmp/{MARKER}_exec'])"),
        "subprocess": program(f"import subprocess\nsubprocess.run(['touch', '/tmp/{MARKER}_sub'], "
                              "check=True)\nreturn 42"),
        "socket_module": program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), "
                                 "timeout=0.5)\ns.sendall(b'escaped')\nreturn 42"),
        "socket_raw": program(f"""
            import ctypes, struct
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.socket(2, 1, 0)
            assert fd >= 0, "socket() failed"
            addr = struct.pack("<HH4s8x", 2, ((({port} & 255) << 8) | ({port} >> 8)), bytes([127, 0, 0, 1]))
            assert libc.connect(fd, addr, 16) == 0, "connect() failed"
            return 42"""),
        "kill_parent": program("import os\nos.kill(os.getppid(), 9)\nreturn 42"),
        "kill_init": program("import os\nos.kill(1, 9)\nreturn 42"),
        "kill_everyone": program("import os\nos.kill(-1, 9)\nreturn 42"),
        "kill_trainer": program(f"import os\nos.kill({os.getpid()}, 9)\nreturn 42"),
        "kill_group": program("import os\nos.killpg(0, 9)\nreturn 42"),
        "sys_exit": program("import sys\nsys.exit(42)"),
        "raise_system_exit": program("raise SystemExit(0)"),
        "os_exit": program("import os\nos._exit(0)"),
        "builtin_exit": program("exit(42)"),
        "ignore_signals": program("""
            import signal, time
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGALRM, signal.SIGHUP):
                signal.signal(s, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_BLOCK, range(1, 32))
            start = time.time()
            while time.time() - start < 30:
                pass
            return 42"""),
        "alarm_storm": program("""
            import signal, time
            def boom(*_):
                raise KeyboardInterrupt
            signal.signal(signal.SIGALRM, boom)
            signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
            start = time.time()
            while time.time() - start < 30:
                try:
                    time.sleep(1)
                except KeyboardInterrupt:
                    pass
            return 42"""),
        "huge_print": program("while True:\n    print('x' * 100000)"),
        "huge_fd_write": program("import os\nwhile True:\n    os.write(2, b'y' * 65536)"),
        "ctypes_crash": program("import ctypes\nctypes.string_at(0)\nreturn 42"),
        "ctypes_memset": program("import ctypes\nctypes.memset(16, 0, 4096)\nreturn 42"),
        "thread_bomb": program("""
            import _thread, time
            while True:
                _thread.start_new_thread(time.sleep, (100,))"""),
        "threading_bomb": program("""
            import threading, time
            while True:
                threading.Thread(target=time.sleep, args=(100,)).start()"""),
        "float_loops": program("""
            class X:
                def __float__(self):
                    while True:
                        pass
            return X()"""),
        "float_and_repr_raise": program("""
            class X:
                def __float__(self):
                    raise ValueError
                def __repr__(self):
                    raise RuntimeError
                __str__ = __repr__
            return X()"""),
        "float_exits": program("""
            class X:
                def __float__(self):
                    import os
                    os._exit(0)
            return X()"""),
        "float_subclass": program("""
            class F(float):
                def __repr__(self):
                    while True:
                        pass
                __str__ = __repr__
            class X:
                def __float__(self):
                    return F("nan")
            return X()"""),
        "huge_str": program("""
            class X:
                def __float__(self):
                    return "not a float"
                def __str__(self):
                    return "4" * 10 ** 7
            return X()"""),
        "huge_int": program("return 10 ** 5000"),
        "read_dataset": program(f"return len(open({str(DATA_FILE)!r}).read()) * 0 + 42"),
        "read_proc": program("return len(open('/proc/1/environ').read()) * 0 + 42"),
        "forge_replies": program("""
            import os
            for fd in range(64):
                try:
                    os.write(fd, b'{"id": 0, "status": "ok", "value": 42}\\n')
                except OSError:
                    pass
            raise RuntimeError("forged what it could")"""),
    }


def processes_with(tag: str):
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if tag in " ".join(proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except psutil.Error:
            pass
    return found


def marker_files():
    return sorted(str(p) for d in WRITABLE_DIRS if d.is_dir() for p in d.glob(f"{MARKER}*"))


def sandbox_owned_files():
    """Entries in the writable directories owned by the sandbox user: anything a program
    managed to create would be (other tests' files, created meanwhile, are not)."""
    found = set()
    for directory in WRITABLE_DIRS:
        try:
            found |= {str(p) for p in directory.iterdir() if p.lstat().st_uid == 65534}
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def scorer():
    scorer = RewardScorer(RewardConfig(cot_type="pcot", timeout_s=TIMEOUT_S, num_workers=2))
    yield scorer
    scorer.close()


def worker_pids(scorer):
    return sorted(w.proc.pid for w in scorer.sandbox._workers)


def test_hostile_programs_get_zero_reward_and_change_nothing(scorer):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    cases = hostile_programs(port)
    assert marker_files() == []
    owned_before = sandbox_owned_files()
    workers_before = worker_pids(scorer)

    start = time.monotonic()
    results = dict(zip(cases, scorer.score(list(cases.values()), ["42"] * len(cases),
                                           ["number"] * len(cases))))
    elapsed = time.monotonic() - start

    grace = scorer.sandbox.config.grace_s  # the backstop: a worker that late is replaced
    assert elapsed < TIMEOUT_S + grace + 1.0, f"batch took {elapsed:.1f}s"
    rewarded = {name: r for name, r in results.items() if r.reward != 0.0}
    assert rewarded == {}
    expected = {
        "infinite_loop": "timeout", "sleep_forever": "timeout", "ignore_signals": "timeout",
        "float_loops": "timeout", "float_subclass": "none",
        "memory_bomb": "memory",
        "huge_print": "output_limit", "huge_fd_write": "output_limit",
        "ctypes_crash": "killed", "ctypes_memset": "killed", "os_exit": "killed",
        "float_exits": "killed",
        "recursion": "error:RecursionError", "fork_bomb": "error:PermissionError",
        "kill_parent": "error:PermissionError", "kill_init": "error:PermissionError",
        "kill_everyone": "error:PermissionError", "kill_trainer": "error:PermissionError",
        "kill_group": "error:PermissionError", "posix_spawn": "error:PermissionError",
        "execv": "error:PermissionError", "sys_exit": "error:SystemExit",
        "raise_system_exit": "error:SystemExit", "builtin_exit": "error:SystemExit",
        "thread_bomb": "error:RuntimeError", "float_and_repr_raise": "error:RuntimeError",
        "huge_int": "error:OverflowError", "forge_replies": "error:BadResult",
        "mkdir_tmp": "error:PermissionError", "os_system": "error:AssertionError",
        "socket_raw": "error:AssertionError", "huge_str": "none",
        "read_proc": "error:PermissionError",
    }
    statuses = {name: results[name].status for name in expected}
    assert statuses == expected
    # how these end depends on machine load (how far they get within the time limit)
    assert results["memory_creep"].status in ("memory", "timeout")
    # the interrupt storm may escape the program's own try (error:KeyboardInterrupt), even
    # hit the harness while it reports (killed: no result), or keep looping (timeout)
    assert results["alarm_storm"].status in ("timeout", "error:KeyboardInterrupt", "killed")
    assert results["deep_recursion"].status in ("killed", "timeout", "memory",
                                                "error:RecursionError")
    for name in [n for n in cases if n.startswith("write_")] + ["read_dataset"]:
        # PermissionError from landlock/seccomp/uid, FileNotFoundError in the deleted cwd
        assert results[name].status in ("error:PermissionError", "error:FileNotFoundError"), name
    for name in ("subprocess", "socket_module", "threading_bomb"):
        # the module may be unreadable for the sandbox user (ModuleNotFoundError); if it
        # imports, the syscall underneath is refused
        assert results[name].status.startswith("error:"), (name, results[name])

    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing connected
    listener.close()
    assert marker_files() == []
    assert sandbox_owned_files() - owned_before == set()
    assert worker_pids(scorer) == workers_before  # no worker was killed or replaced
    good = scorer.score(["def solution():\n    return 6 * 7"], ["42"], ["number"])
    assert good[0].reward == 1.0


def test_mixed_batch_keeps_good_answers(scorer):
    good = {f"good_{k}": (program(f"a = {k}\nb = 3\nreturn a * b + 0.5"), str(k * 3 + 0.5))
            for k in range(40)}
    bad = hostile_programs(port=9)
    names = list(good) + list(bad)
    programs = [good[n][0] if n in good else bad[n] for n in names]
    golds = [good[n][1] if n in good else "42" for n in names]
    order = sorted(range(len(names)), key=lambda i: (i * 7919) % len(names))  # interleave
    results = scorer.score([programs[i] for i in order], [golds[i] for i in order],
                           ["number"] * len(order))
    by_name = {names[i]: r for i, r in zip(order, results)}
    assert {n: by_name[n] for n in good if by_name[n].reward != 1.0} == {}
    assert {n: by_name[n].extracted for n in good} == {n: good[n][1] for n in good}
    assert [n for n in bad if by_name[n].reward != 0.0] == []


def test_environment_and_limits_inside(scorer):
    os.environ["REFT_TEST_SECRET"] = "do-not-leak"
    try:
        pool = scorer.sandbox
        results = pool.run([
            program("import os\nreturn len(os.environ)"),
            program("import resource\nreturn resource.getrlimit(resource.RLIMIT_NPROC)[0]"),
            program("import resource\nreturn resource.getrlimit(resource.RLIMIT_FSIZE)[0]"),
            program("import os\nreturn len(os.listdir('.'))"),
            program("import os\nreturn os.getuid()"),
            program("return math.sqrt(16) + math.pi * 0"),
        ])
    finally:
        del os.environ["REFT_TEST_SECRET"]
    values = [r.value for r in results]
    assert values[:3] == [0.0, 0.0, 0.0]
    # the working directory is a deleted, empty directory outside the readable allowlist
    assert results[3].status in ("error:FileNotFoundError", "error:PermissionError")
    if os.geteuid() == 0:
        assert values[4] == 65534.0  # root trainers' programs run as nobody
    assert values[5] == 4.0


def test_isolation_in_force_here(scorer):
    report = scorer.sandbox.isolation
    checks = report["checks"]
    for check in ("fork", "socket", "write_tmp", "signal_parent"):
        assert checks[check].startswith("denied"), (check, checks)
    assert "net" in report["namespaces"] and "pid" in report["namespaces"]
    assert report["torch_loaded"] is False  # the worker stays small
    assert "MISSING" not in scorer.isolation_summary, scorer.isolation_summary


def test_nothing_left_after_close():
    others = set(sandbox_descendants())  # e.g. the module scorer's long-lived executors
    scorer = RewardScorer(RewardConfig(cot_type="pcot", timeout_s=TIMEOUT_S, num_workers=1))
    scorer.score([program("while True:\n    pass")] * 3 + [program("return 1")], ["1"] * 4,
                 ["number"] * 4)
    tag = f'"pool": "{scorer.sandbox.tag}"'  # on the workers' command lines
    pids = processes_with(tag)
    assert len(pids) >= 2  # launcher + zygote
    scorer.close()
    deadline = time.monotonic() + 10  # generous: processes of other tests may load the CPU
    while (processes_with(tag) or set(sandbox_descendants()) - others) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(tag) == []
    assert set(sandbox_descendants()) - others == set()
    # the zygote's working directory is removed the moment it is entered
    assert list(Path(tempfile.gettempdir()).glob("megatron-reft-sandbox-*")) == []


def sandbox_descendants():
    """Processes below this test process running as the sandbox user (zombies included)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.uids().real == 65534:
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found

"""Trainer side of the sandbox: a pool of long-lived worker processes and a batch API.

    pool = SandboxPool(SandboxConfig(num_workers=2, timeout_s=2.0))
    results = pool.run(["def solution():\n    return 1 + 1", ...])  # [ProgramResult(status, value)]
    pool.close()

Each worker (worker.py) is a separate interpreter started once with an empty environment; it
forks a locked-down child per program. Programs that mention a heavy module (sympy, numpy) go
to a separate group of workers that preloads it, so the common case forks a small interpreter.

The caller cannot hang: every request has a backstop deadline (timeout + grace); a worker that
misses it, dies, or breaks the protocol is killed and replaced, and its programs are reported
as "killed". Only validated plain data (a status string and a number or short string) is
accepted from workers - JSON, never pickle.
"""
from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import re
import selectors
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from .report import describe_isolation

log = logging.getLogger("megatron_reft.reward.sandbox")

DEFAULT_PRELOAD = ("math", "fractions", "decimal", "itertools", "functools", "collections",
                   "datetime", "re", "cmath", "operator", "string")
# Programs naming these go to the heavy workers. sympy and numpy are big (every fork of a
# worker holding them costs more); random (and statistics, which imports it) reseeds itself
# after every fork, measured at 0.13 ms of a light fork's ~1.7 ms.
HEAVY_MODULES = ("sympy", "numpy", "statistics", "random")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from megatron_reft.reward.sandbox.worker import main; main(sys.argv[2])")
# Empty environment for workers (no tokens or paths leak to programs); single-threaded BLAS so
# a preloaded numpy never tries to start threads the sandbox forbids.
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_STATUS_RE = re.compile(r"(ok|timeout|memory|killed|output_limit|error:[A-Za-z_][A-Za-z0-9_]{0,63})\Z")
_MAX_LINE_BYTES = 1 << 20


class SandboxError(RuntimeError):
    """The sandbox itself cannot run (workers fail to start, or isolation was required and is
    missing). Never raised because of what a program does."""


@dataclass
class SandboxConfig:
    num_workers: int = 2              # light workers (math & stdlib preloaded)
    timeout_s: float = 2.0            # wall clock per program, the reference's value
    memory_mb: int = 512              # address space a program may add to the interpreter's
    output_limit_bytes: int = 256 << 10  # stdout+stderr per program before it is killed
    children_per_worker: int = 16     # programs one worker runs at the same time
    fast_path_budget_s: float = 0.05  # statically pure programs share a jailed executor for
                                      # up to this long each (then they fork); 0 disables
    executor_max_programs: int = 5_000  # then the executor is replaced
    max_programs_per_worker: int = 20_000  # then the worker is replaced
    preload: tuple = DEFAULT_PRELOAD
    heavy_modules: tuple = HEAVY_MODULES  # programs naming these go to heavy workers
    heavy_workers: int = 1            # started on the first program that needs one
    sandbox_uid: int = 65534          # "nobody"; used when the trainer runs as root
    nice: int = 0                     # >0 favours the trainer, but on a loaded node a niced
                                      # program starves and times out: load becomes reward noise
    max_open_files: int = 64
    max_program_chars: int = 100_000
    grace_s: float = 5.0              # backstop beyond timeout_s before a worker is presumed stuck
    startup_timeout_s: float = 60.0
    require_isolation: bool = False   # refuse to start unless every mechanism is in force

    def __post_init__(self):
        positive = ("num_workers", "timeout_s", "memory_mb", "output_limit_bytes",
                    "children_per_worker", "max_programs_per_worker", "max_open_files",
                    "max_program_chars", "grace_s", "startup_timeout_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox.{name} must be > 0, got {getattr(self, name)!r}")
        if self.fast_path_budget_s < 0 or self.executor_max_programs < 1:
            raise ValueError("sandbox.fast_path_budget_s must be >= 0 and "
                             "sandbox.executor_max_programs >= 1")
        if self.heavy_workers < 0:
            raise ValueError(f"sandbox.heavy_workers must be >= 0, got {self.heavy_workers!r}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"sandbox.nice must be in 0..19, got {self.nice!r}")
        self.preload, self.heavy_modules = tuple(self.preload), tuple(self.heavy_modules)


@dataclass(frozen=True)
class ProgramResult:
    """status: ok | timeout | memory | killed | output_limit | error:<ExceptionType>;
    value: solution()'s return value as a float or a string of at most 200 characters."""
    status: str
    value: float | str | None = None


class _Worker:
    """One worker process and the requests it owes answers for."""

    def __init__(self, group: str, config: SandboxConfig, pool_tag: str):
        self.group = group
        preload = config.preload + (config.heavy_modules if group == "heavy" else ())
        worker_cfg = {"pool": pool_tag, "max_children": config.children_per_worker,
                      "preload": list(preload),
                      "output_limit_bytes": config.output_limit_bytes,
                      "memory_mb": config.memory_mb, "sandbox_uid": config.sandbox_uid,
                      "nice": config.nice, "max_open_files": config.max_open_files,
                      "fast_path_budget_s": config.fast_path_budget_s,
                      "executor_max_programs": config.executor_max_programs}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _BOOT, _PACKAGE_ROOT, json.dumps(worker_cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_WORKER_ENV, cwd="/",
            start_new_session=True)  # Ctrl-C in the trainer's terminal does not reach it
        self.in_fd, self.out_fd = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self.in_fd, False)
        os.set_blocking(self.out_fd, False)
        self.started = time.monotonic()
        self.ready = None            # the worker's start-up report, once received
        self.outstanding = {}        # request id -> backstop deadline
        self.wbuf = bytearray()
        self.rbuf = bytearray()
        self.programs = 0
        self.dead = False

    def kill(self):
        self.dead = True
        try:
            self.proc.kill()  # the launcher; the zygote and its children die with it
        except OSError:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class SandboxPool:
    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self._owner_pid = os.getpid()
        self.tag = f"{os.getpid()}-{id(self):x}"  # on the workers' command lines, to find them
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._workers: list[_Worker] = []
        self._next_id = 0
        self._failed_starts = 0
        self._heavy_re = (re.compile(r"\b(" + "|".join(map(re.escape, self.config.heavy_modules))
                                     + r")\b") if self.config.heavy_modules
                          and self.config.heavy_workers else None)
        self.isolation: dict | None = None
        self.isolation_summary = ""
        self._closed = False
        atexit.register(_close_quietly, weakref.ref(self))
        try:
            with self._lock:
                for _ in range(self.config.num_workers):
                    self._start_worker("light")
                self._wait_ready("light")
        except BaseException:
            self.close()
            raise

    # ---- public API

    def run(self, programs: list[str], timeout_s: float | None = None) -> list[ProgramResult]:
        """Run every program; return one ProgramResult per program, in order. Programs run
        concurrently (up to children_per_worker per worker), each with `timeout_s` of wall
        time from its start."""
        timeout_s = self.config.timeout_s if timeout_s is None else float(timeout_s)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox pool is closed")
            if os.getpid() != self._owner_pid:
                raise SandboxError("a sandbox pool cannot be used from a forked process; "
                                   "create one there")
            return _Batch(self, programs, timeout_s).run()

    def close(self):
        with self._lock:
            if self._closed or os.getpid() != self._owner_pid:  # a forked copy owns nothing
                return
            self._closed = True
            for worker in self._workers:
                try:
                    worker.proc.stdin.close()  # EOF: the zygote kills its children and exits
                except OSError:
                    pass
            # The zygote kills its programs and exits; as PID 1 its exit waits for its pid
            # namespace to empty, then the launcher exits. Normally milliseconds.
            deadline = time.monotonic() + 5.0
            for worker in self._workers:
                try:
                    worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
                worker.kill()
            self._workers = []
            self._selector.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- workers

    def _start_worker(self, group: str) -> _Worker:
        worker = _Worker(group, self.config, self.tag)
        self._workers.append(worker)
        self._selector.register(worker.out_fd, selectors.EVENT_READ, worker)
        return worker

    def _replace(self, worker: _Worker, reason: str):
        if worker in self._workers:
            self._workers.remove(worker)
        if not worker.dead:
            self._selector.unregister(worker.out_fd)
            if worker.wbuf:
                self._selector.unregister(worker.in_fd)
            worker.kill()
        if reason != "retired":
            log.warning("sandbox: %s worker %s (%s); starting a new one", worker.group,
                        reason, f"{len(worker.outstanding)} programs reported as killed")
        if worker.ready is None and reason != "retired":
            self._failed_starts += 1
            if self._failed_starts >= 3:
                raise SandboxError("sandbox workers keep failing to start; see stderr above")
        self._start_worker(worker.group)

    def _wait_ready(self, group: str):
        deadline = time.monotonic() + self.config.startup_timeout_s
        while any(w.ready is None for w in self._workers if w.group == group):
            if time.monotonic() > deadline:
                raise SandboxError(f"sandbox workers did not start within "
                                   f"{self.config.startup_timeout_s}s")
            self._pump(0.1, on_result=None)
            self._check_health()

    def _on_ready(self, worker: _Worker, report: dict):
        worker.ready = report
        self._failed_starts = 0
        if self.isolation is None:
            self.isolation = report
            self.isolation_summary, missing = describe_isolation(report)
            (log.warning if missing else log.info)("%s", self.isolation_summary)
            if missing and self.config.require_isolation:
                raise SandboxError(f"sandbox isolation required but missing: {', '.join(missing)}")
        if report.get("fatal"):
            raise SandboxError(f"sandbox probe failed: {report['fatal']}")

    # ---- I/O

    def _send(self, worker: _Worker, request: dict):
        if not worker.wbuf:
            self._selector.register(worker.in_fd, selectors.EVENT_WRITE, worker)
        worker.wbuf += (json.dumps(request) + "\n").encode()

    def _pump(self, wait_s: float, on_result):
        """One round of select: write pending requests, read replies."""
        for key, events in self._selector.select(wait_s):
            worker = key.data
            if worker.dead:
                continue
            if key.fd == worker.in_fd:
                self._write(worker)
            else:
                self._read(worker, on_result)

    def _write(self, worker: _Worker):
        try:
            written = os.write(worker.in_fd, worker.wbuf)
        except BlockingIOError:
            return
        except OSError:
            self._fail(worker, "died")
            return
        del worker.wbuf[:written]
        if not worker.wbuf:
            self._selector.unregister(worker.in_fd)

    def _read(self, worker: _Worker, on_result):
        try:
            data = os.read(worker.out_fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._fail(worker, "died")
            return
        worker.rbuf += data
        *lines, rest = worker.rbuf.split(b"\n")
        worker.rbuf = bytearray(rest)
        if len(worker.rbuf) > _MAX_LINE_BYTES:
            self._fail(worker, "sent an oversized line")
            return
        for line in lines:
            message = _parse_reply(line)
            if message is None:
                self._fail(worker, "broke the protocol")
                return
            if "ready" in message:
                self._on_ready(worker, message["ready"])
            elif message["id"] in worker.outstanding:
                del worker.outstanding[message["id"]]
                worker.programs += 1
                if on_result is not None:
                    on_result(message["id"], ProgramResult(message["status"], message["value"]))

    def _fail(self, worker: _Worker, reason: str):
        """Kill and replace a worker; its unanswered programs are reported as killed."""
        lost = list(worker.outstanding)
        self._replace(worker, reason)
        for rid in lost:
            if self._on_lost is not None:
                self._on_lost(rid)

    _on_lost = None    # set by the running batch: how to report programs of a failed worker
    _on_result = None  # and how to report an answer

    def _check_health(self):
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.ready is None and now - worker.started > self.config.startup_timeout_s:
                self._fail(worker, "did not start in time")
            elif worker.outstanding and now > min(worker.outstanding.values()):
                self._read(worker, self._on_result)  # answers may be waiting: we were away
                if (not worker.dead and worker.outstanding
                        and now > min(worker.outstanding.values())):
                    self._fail(worker, "missed a deadline")
            elif (worker.programs >= self.config.max_programs_per_worker
                  and not worker.outstanding):
                self._replace(worker, "retired")


class _Batch:
    """The state of one run() call: which program goes where, and what came back."""

    def __init__(self, pool: SandboxPool, programs, timeout_s: float):
        self.pool, self.programs, self.timeout_s = pool, list(programs), timeout_s
        self.results: list[ProgramResult | None] = [None] * len(self.programs)
        self.slot_of = {}  # request id -> index into programs
        self.pending = {"light": collections.deque(), "heavy": collections.deque()}
        for index, code in enumerate(self.programs):
            if not isinstance(code, str) or not code.strip():
                self.results[index] = ProgramResult("error:EmptyProgram")
            elif len(code) > pool.config.max_program_chars:
                self.results[index] = ProgramResult("error:ProgramTooLong")
            else:
                heavy = pool._heavy_re is not None and pool._heavy_re.search(code)
                self.pending["heavy" if heavy else "light"].append(index)
        self.remaining = sum(r is None for r in self.results)

    def run(self) -> list[ProgramResult]:
        pool = self.pool
        pool._on_lost, pool._on_result = self._lost, self._done
        try:
            while self.remaining:
                self._dispatch()
                pool._pump(self._wait_s(), on_result=self._done)
                pool._check_health()
        finally:
            pool._on_lost = pool._on_result = None
        return self.results

    def _done(self, rid: int, result: ProgramResult):
        index = self.slot_of.pop(rid, None)
        if index is not None and self.results[index] is None:
            self.results[index] = result
            self.remaining -= 1

    def _lost(self, rid: int):
        self._done(rid, ProgramResult("killed"))

    def _dispatch(self):
        pool = self.pool
        for group, queue in self.pending.items():
            if not queue:
                continue
            workers = [w for w in pool._workers if w.group == group]
            if group == "heavy" and len(workers) < pool.config.heavy_workers:
                for _ in range(pool.config.heavy_workers - len(workers)):
                    pool._start_worker("heavy")
                continue
            open_workers = [w for w in workers if self._has_room(w)]
            while queue and open_workers:  # round robin: every zygote forks its share
                for worker in list(open_workers):
                    if not queue:
                        break
                    self._send(worker, queue.popleft())
                    if not self._has_room(worker):
                        open_workers.remove(worker)

    def _has_room(self, worker: _Worker) -> bool:
        config = self.pool.config
        return (worker.ready is not None and not worker.dead
                and len(worker.outstanding) < config.children_per_worker
                and worker.programs + len(worker.outstanding) < config.max_programs_per_worker)

    def _send(self, worker: _Worker, index: int):
        pool = self.pool
        rid = pool._next_id
        pool._next_id += 1
        self.slot_of[rid] = index
        worker.outstanding[rid] = time.monotonic() + self.timeout_s + pool.config.grace_s
        pool._send(worker, {"id": rid, "code": self.programs[index], "timeout": self.timeout_s})

    def _wait_s(self) -> float:
        deadlines = [d for w in self.pool._workers for d in w.outstanding.values()]
        if not deadlines:
            return 0.05
        return min(0.5, max(0.0, min(deadlines) - time.monotonic()))


def _parse_reply(line: bytes):
    """A validated message from a worker, or None if it is not one we understand."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    if "ready" in message:
        return message if isinstance(message["ready"], dict) else None
    rid, status, value = message.get("id"), message.get("status"), message.get("value")
    if type(rid) is not int or not isinstance(status, str) or not _STATUS_RE.match(status):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str, type(None))):
        return None
    if isinstance(value, int):
        value = float(value)
    if isinstance(value, str) and len(value) > 200:
        return None
    return {"id": rid, "status": status, "value": value}


def _close_quietly(pool_ref):
    pool = pool_ref()
    if pool is not None:
        try:
            pool.close()
        except Exception:
            pass

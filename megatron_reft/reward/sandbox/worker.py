"""Sandbox worker process: launcher -> zygote -> one forked child per program.

Started by pool.py as `python -I -B -c <boot> <package root> <config json>` with an empty
environment. Three roles, top to bottom:

* launcher: enters fresh namespaces (pid, net, ipc; plus user when not root), forks the
  zygote, then only waits for it. Killing the launcher kills the zygote (parent-death
  signal), and the zygote's death kills everything in its pid namespace (kernel rule).
* zygote: PID 1 of the new pid namespace. Imports math (and whatever `preload` names) once,
  prepares the jail, probes which mechanisms work, then serves JSON-line requests from the
  trainer on stdin: for each program it forks a child, enforces wall time and output size,
  reaps it and answers with a validated {id, status, value} line on stdout.
* child: locks itself down (jail.py), runs the program, writes one JSON line, exits.
* executor (fastpath.py, executor.py): one long-lived jailed child that runs statically
  pure programs (purity.py) back to back, each with fresh globals; anything else, or
  anything slow, gets its own child.

Why fork per program rather than running programs inside a locked-down worker: a fork of
the warm zygote costs ~1.9 ms of CPU per program all included (~800-1,000 programs/s on 2
cores, against ~22 ms for a fresh interpreter), gives every program a pristine interpreter
(a program that rebinds math.pi cannot poison the next one's reward), and lets the zygote
kill a stuck program without losing its warm state. Programs that provably cannot change
anything skip the fork (~0.2 ms each). Measurements in docs/benchmarks.md.

Only the standard library and the sandbox's own modules are imported here: the zygote's size
is what every fork pays for.
"""
import collections
import gc
import json
import os
import re
import select
import signal
import sys
import time

from . import jail as jail_mod
from . import kernel
from . import prepare
from .fastpath import FastLane

_STATUS_RE = re.compile(r"(ok|memory|error:[A-Za-z_][A-Za-z0-9_]{0,63})\Z")


# ---- launcher ---------------------------------------------------------------------------------

def main(config_json: str) -> None:
    cfg = json.loads(config_json)
    proto_in, proto_out = os.dup(0), os.dup(1)  # the trainer's pipes; 0/1 become /dev/null
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    namespaces = _enter_namespaces()
    if "pid" in namespaces:
        _fork_zygote([proto_in, proto_out])
    Zygote(cfg, proto_in, proto_out, namespaces).serve()


def _enter_namespaces() -> list:
    """Try the strongest combination first; return the namespaces now in force."""
    root = os.geteuid() == 0
    core = [("pid", kernel.CLONE_NEWPID), ("net", kernel.CLONE_NEWNET),
            ("ipc", kernel.CLONE_NEWIPC)]
    attempts = [core, core[1:], core[1:2]]
    for with_user in ([False, True] if root else [True]):
        for names in attempts:
            flags = sum(flag for _, flag in names) | (kernel.CLONE_NEWUSER if with_user else 0)
            try:
                kernel.unshare(flags)
                if with_user:
                    kernel.map_current_user()
                return [name for name, _ in names] + (["user"] if with_user else [])
            except OSError:
                continue
    return []


def _fork_zygote(proto_fds) -> None:
    """The first child after unshare(CLONE_NEWPID) is PID 1 of the new namespace. Returns in
    that child; the launcher stays behind as a plain waiter and never returns."""
    pid = os.fork()
    if pid == 0:
        kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
        return
    for fd in proto_fds:
        os.close(fd)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        except InterruptedError:
            continue


# ---- zygote -----------------------------------------------------------------------------------

class Running:
    """One forked child and what the zygote knows about it."""
    __slots__ = ("rid", "pid", "out_fd", "result_fd", "deadline", "output_bytes", "verdict")

    def __init__(self, rid, pid, out_fd, result_fd, deadline):
        self.rid, self.pid, self.out_fd, self.result_fd = rid, pid, out_fd, result_fd
        self.deadline = deadline
        self.output_bytes = 0
        self.verdict = None  # "timeout" / "output_limit" once the zygote has killed it


class Zygote:
    def __init__(self, cfg, proto_in, proto_out, namespaces):
        self.cfg = cfg
        self.proto_in, self.proto_out = proto_in, proto_out
        self.namespaces = namespaces
        self.max_children = int(cfg["max_children"])
        self.output_limit = int(cfg["output_limit_bytes"])
        if "user" in namespaces:
            kernel.drop_capabilities()  # the user namespace gave us a full set we do not need
        try:  # the zygote enforces deadlines: keep it responsive on a busy machine (root only)
            os.setpriority(os.PRIO_PROCESS, 0, -5)
        except OSError:
            pass
        self.preloaded, self.preload_errors = prepare.preload(cfg["preload"])  # globals for programs
        prepare.enter_empty_directory()
        self.jail, zygote_program, self.jail_info = prepare.build_jail(cfg, namespaces)
        prepare.restrict_zygote(self.jail, zygote_program, self.jail_info)
        self.queue = collections.deque()
        self.running = {}   # pid -> Running
        self.by_out_fd = {}  # out fd -> Running
        self.replies = []
        self.inbuf = b""
        self.forks_since_refresh = 0

    # -- start-up probe

    def probe(self) -> dict:
        """Fork one child that enters the jail step by step and then tests what it can still
        do. Steps that fail here are switched off for real programs (and reported)."""
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            report = {}
            try:
                import _socket  # before the jail (it may hide the stdlib); the zygote stays lean
                self.jail.enter(out_w, res_w, 1.0, report=report)
                report["checks"] = prepare.self_checks(_socket)
            except BaseException as err:
                report["fatal"] = repr(err)
            jail_mod._write(jail_mod.RESULT_FD, json.dumps(report).encode())
            jail_mod._exit(0)
        os.close(out_w)
        os.close(res_w)
        os.waitpid(pid, 0)
        data = _read_available(res_r, 1 << 16)
        os.close(res_r)
        os.close(out_r)
        report = json.loads(data.decode()) if data else {"fatal": "probe child died"}
        for step in jail_mod.STEPS:
            if not str(report.get(step, "ok")).startswith("ok"):
                self.jail.enabled.discard(step)
        return report

    def ready_message(self, report) -> dict:
        jail = self.jail
        return {"ready": dict(
            self.jail_info,
            namespaces=self.namespaces,
            euid=os.geteuid(),
            sandbox_uid=jail.sandbox_uid if "drop_user" in jail.enabled else None,
            steps={step: report.get(step, "skipped") for step in jail_mod.STEPS},
            checks=report.get("checks", {}),
            fatal=report.get("fatal"),
            preloaded=[m for m in self.cfg["preload"] if m not in self.preload_errors],
            preload_errors=self.preload_errors,
            modules=len(sys.modules),
            torch_loaded="torch" in sys.modules,
            address_space_mb=jail.base_address_space >> 20,
            fast_path_budget_s=float(self.cfg["fast_path_budget_s"]),
        )}

    # -- main loop

    def serve(self):
        signal.signal(signal.SIGCHLD, lambda *_: None)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        report = self.probe()
        prepare.warm_up(self.preloaded)
        signal.set_wakeup_fd(wake_w)
        self._send(self.ready_message(report))
        gc.freeze()  # children never walk the zygote's objects: fewer copied pages per fork
        self.poller = select.poll()
        self.poller.register(self.proto_in, select.POLLIN)
        self.poller.register(wake_r, select.POLLIN)
        self.fast = FastLane(self.jail, self.poller,
                             budget_s=float(self.cfg["fast_path_budget_s"]),
                             max_programs=int(self.cfg["executor_max_programs"]),
                             reply=self._reply, fork=self.queue.append, verdict=verdict_for)
        while True:
            self.fast.feed()
            self._start_children()
            for fd, _ in self.poller.poll(self._poll_timeout_ms()):
                if fd == self.proto_in:
                    self._read_requests()
                elif fd == wake_r:
                    _read_available(wake_r, 1 << 16)
                    self._reap()
                elif fd == self.fast.reply_fd:
                    self.fast.on_readable()
                else:
                    self._drain_output(self.by_out_fd.get(fd))
            self._enforce_deadlines()
            self._flush_replies()

    def _poll_timeout_ms(self):
        deadlines = [c.deadline for c in self.running.values() if c.verdict is None]
        if self.fast.deadline is not None:
            deadlines.append(self.fast.deadline)
        if not deadlines:
            return None if not self.running else 50  # killed ones: SIGCHLD will wake us
        return max(0, int((min(deadlines) - time.monotonic()) * 1000) + 1)

    def _read_requests(self):
        data = os.read(self.proto_in, 1 << 20)
        if not data:
            self._shutdown()
        self.inbuf += data
        *lines, self.inbuf = self.inbuf.split(b"\n")
        for line in lines:
            if line.strip():
                request = json.loads(line)
                self.fast.submit((int(request["id"]), str(request["code"]),
                                  float(request["timeout"])))

    def _start_children(self):
        while self.queue and len(self.running) < self.max_children:
            rid, code, timeout_s = self.queue.popleft()
            self.forks_since_refresh += 1
            if self.forks_since_refresh >= 256:
                self.jail.refresh_base()
                self.forks_since_refresh = 0
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            res_r, res_w = os.pipe2(os.O_CLOEXEC)
            pid = os.fork()
            if pid == 0:
                try:
                    jail_mod.child_main(self.jail, code, timeout_s, out_w, res_w, self.preloaded)
                finally:
                    os._exit(1)
            os.close(out_w)
            os.close(res_w)
            os.set_blocking(out_r, False)
            os.set_blocking(res_r, False)
            child = Running(rid, pid, out_r, res_r, time.monotonic() + timeout_s)
            self.running[pid] = child
            self.by_out_fd[out_r] = child
            self.poller.register(out_r, select.POLLIN)

    def _drain_output(self, child):
        """Count (and discard) what the program prints; kill it once over the cap."""
        if child is None:
            return
        while True:
            try:
                chunk = os.read(child.out_fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.poller.unregister(child.out_fd)
                del self.by_out_fd[child.out_fd]
                return
            child.output_bytes += len(chunk)
            if child.output_bytes > self.output_limit and child.verdict is None:
                self._kill(child, "output_limit")

    def _enforce_deadlines(self):
        now = time.monotonic()
        self.fast.enforce(now)
        if any(c.verdict is None and now >= c.deadline for c in self.running.values()):
            self._reap()  # one that exited while we were descheduled did not time out
        for child in self.running.values():
            if child.verdict is None and now >= child.deadline:
                self._kill(child, "timeout")

    def _kill(self, child, verdict):
        child.verdict = verdict
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.running.pop(pid, None)
            if child is not None:
                self._finish(child, status)
            else:
                self.fast.on_exit(pid)

    def _finish(self, child, wait_status):
        if child.out_fd in self.by_out_fd:
            self._drain_output(child)
            if child.out_fd in self.by_out_fd:
                self.poller.unregister(child.out_fd)
                del self.by_out_fd[child.out_fd]
        os.close(child.out_fd)
        raw = _read_available(child.result_fd, jail_mod.MAX_RESULT_BYTES + 1)
        os.close(child.result_fd)
        self._reply(child.rid, *verdict_for(child.verdict, wait_status, raw))

    def _reply(self, rid, status, value):
        self.replies.append({"id": rid, "status": status, "value": value})

    def _flush_replies(self):
        if self.replies:
            data = "".join(json.dumps(r) + "\n" for r in self.replies).encode()
            self.replies = []
            self._write_all(data)

    def _send(self, message):
        self._write_all((json.dumps(message) + "\n").encode())

    def _write_all(self, data):
        try:
            while data:
                data = data[os.write(self.proto_out, data):]
        except (BrokenPipeError, InterruptedError):
            self._shutdown()

    def _shutdown(self):
        """The trainer closed our stdin (or died): stop everything and leave."""
        for child in self.running.values():
            self._kill(child, "killed")
        os._exit(0)  # as PID 1 of the namespace, our exit also kills any straggler


def verdict_for(zygote_verdict, wait_status, raw: bytes):
    """Status and value of a finished child, from what the zygote saw and what it reported.
    Everything read from the child is validated: only a known status and a number or a
    short string come out."""
    if zygote_verdict is not None:
        return zygote_verdict, None
    if os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == signal.SIGXCPU:
        return "timeout", None
    try:
        report = json.loads(raw.decode("utf-8")) if len(raw) <= jail_mod.MAX_RESULT_BYTES else None
    except (ValueError, UnicodeDecodeError):
        report = None
    if not isinstance(report, dict):  # died by a signal or os._exit, or garbled its report
        return ("error:BadResult" if raw.strip() else "killed"), None
    status, value = report.get("status"), report.get("value")
    if not isinstance(status, str) or not _STATUS_RE.match(status):
        return "error:BadResult", None
    if isinstance(value, bool) or not isinstance(value, (int, float, str, type(None))):
        return "error:BadResult", None
    if isinstance(value, int):
        value = float(value) if abs(value) < 2 ** 1000 else None
    if isinstance(value, str):
        value = value[:jail_mod.MAX_VALUE_CHARS]
    return status, value


def _read_available(fd, limit) -> bytes:
    chunks, size = [], 0
    while size < limit:
        try:
            chunk = os.read(fd, min(1 << 16, limit - size))
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)

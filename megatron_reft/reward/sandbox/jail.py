"""What happens inside one forked child: lock it down, run the program, report a plain value.

The zygote (worker.py) prepares everything expensive once - the seccomp programs, the
landlock ruleset, the preloaded modules - and applies what it can to itself (most of the
seccomp denylist, oom_score_adj, zero rlimits for file size, core dumps, locked memory), so
after each fork the child only makes a few dozen cheap syscalls before running untrusted code.
Order matters:

  session + fds -> nice -> rlimits -> drop to the sandbox user -> no_new_privs, not dumpable,
  parent-death signal -> landlock -> seccomp (process creation and signals)

Steps that failed in the start-up probe are skipped (and reported once by the pool); a step
that worked in the probe and fails later aborts the child before the program runs (fail closed).
"""
import builtins
import json
import math
import os
import resource
import signal

from . import kernel

RESULT_FD = 3            # where the child writes its one JSON result line
MAX_RESULT_BYTES = 4096  # the zygote reads at most this much from RESULT_FD
MAX_VALUE_CHARS = 200    # longer string answers count as no answer

STEPS = ("session", "nice", "rlimits", "drop_user", "no_new_privs", "landlock", "seccomp")

# Captured at import so a program that rebinds os.write or json.dumps cannot break reporting
# of *other* programs (each child is a fresh fork of the untouched zygote anyway).
_write = os.write
_exit = os._exit
_encode_str = json.encoder.encode_basestring_ascii
_float_repr = float.__repr__
_type_name = type.__dict__["__name__"].__get__


class Jail:
    """Everything a child needs to lock itself down, prepared in the zygote."""

    def __init__(self, memory_mb: int, sandbox_uid, nice: int, max_open_files: int,
                 devnull_fd: int, seccomp_program=None, landlock_fd=None):
        self.memory_bytes = int(memory_mb) << 20
        self.devnull_fd = devnull_fd
        self.sandbox_uid = sandbox_uid    # None: keep the current uid (non-root trainers)
        self.nice = nice
        self.max_open_files = max_open_files
        self.seccomp_program = seccomp_program
        self.landlock_fd = landlock_fd
        self.enabled = set(STEPS)
        self.base_address_space = _address_space_bytes()

    def refresh_base(self):
        """The address-space limit is relative to the zygote's own size, which may grow."""
        self.base_address_space = _address_space_bytes()

    def enter(self, out_fd: int, result_fd: int, timeout_s: float, report=None, stdin_fd=None):
        """Lock down the current (freshly forked) process. With `report` (a dict), record each
        step's outcome and carry on (the start-up probe); without, raise on the first failure."""
        self._fds(out_fd, result_fd, self.devnull_fd if stdin_fd is None else stdin_fd)
        for step in STEPS:
            if step not in self.enabled:
                continue
            try:
                getattr(self, "_" + step)(timeout_s)
                if report is not None:
                    report[step] = "ok"
            except OSError as err:
                if report is None:
                    raise
                report[step] = f"failed: {err}"

    def _fds(self, out_fd, result_fd, stdin_fd):
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(stdin_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.dup2(result_fd, RESULT_FD)
        keep = self.landlock_fd  # closed right after use in _landlock
        if keep is not None and keep > RESULT_FD:
            os.closerange(RESULT_FD + 1, keep)
            os.closerange(keep + 1, 1 << 20)
        else:
            os.closerange(RESULT_FD + 1, 1 << 20)

    def _session(self, timeout_s):
        os.setsid()  # no controlling terminal: /dev/tty and terminal ioctls are out of reach

    def _nice(self, timeout_s):
        os.setpriority(os.PRIO_PROCESS, 0, self.nice)  # spinning programs yield to the trainer

    def _rlimits(self, timeout_s):
        # FSIZE, CORE, MEMLOCK and MSGQUEUE are 0 already, inherited from the zygote
        cpu = int(math.ceil(timeout_s)) + 1  # SIGXCPU backstop, the zygote's kill comes first
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (self.base_address_space + self.memory_bytes,) * 2)
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no processes, no threads
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_open_files,) * 2)

    def _drop_user(self, timeout_s):
        if self.sandbox_uid is None:
            return
        os.setgroups([])
        os.setresgid(self.sandbox_uid, self.sandbox_uid, self.sandbox_uid)
        os.setresuid(self.sandbox_uid, self.sandbox_uid, self.sandbox_uid)

    def _no_new_privs(self, timeout_s):
        kernel.prctl(kernel.PR_SET_NO_NEW_PRIVS, 1)
        kernel.prctl(kernel.PR_SET_DUMPABLE, 0)  # no ptrace by same-uid processes, no core
        kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)  # (cleared by setuid: set after)

    def _landlock(self, timeout_s):
        if self.landlock_fd is None:
            return
        kernel.landlock_restrict_self(self.landlock_fd)
        os.close(self.landlock_fd)

    def _seccomp(self, timeout_s):
        if self.seccomp_program is not None:
            self.seccomp_program.install()


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


# ---- running the program ---------------------------------------------------------------------

def fork_globals(preloaded: dict) -> dict:
    """Globals of a program in its own fork: the real builtins (the fork is thrown away) and
    the preloaded modules the reference prepends (`import math`, `import sympy`)."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    namespace.update(preloaded)
    return namespace


def run_program(code, namespace: dict):
    """Execute `code` (source or a parsed tree) in `namespace`, call solution(), return
    (status, plain value). Runs jailed."""
    try:
        exec(compile(code, "<program>", "exec"), namespace)
        return "ok", to_plain(namespace["solution"]())
    except MemoryError:
        return "memory", None
    except BaseException as err:  # SystemExit, KeyboardInterrupt raised by the program too
        return "error:" + _safe_type_name(err), None


def to_plain(value):
    """Numbers become floats, text is cut short, anything else is converted *here*, on the
    untrusted side, under the time limit: a __float__ or __str__ that loops or crashes only
    hurts this program."""
    kind = type(value)
    if value is None:
        return None
    if kind is str:
        return _short(value)
    if kind in (bool, int, float):
        return float(value)
    try:
        number = float(value)  # sympy, numpy, Fraction, Decimal, ...
        return float.__float__(number) if isinstance(number, float) else None
    except (TypeError, ValueError, OverflowError):
        return _short(str(value))


def _short(text):
    """Answers are numbers or letters: longer text is no answer (cutting it could turn 300
    digits into a different number)."""
    if not isinstance(text, str) or len(text) > MAX_VALUE_CHARS:
        return None
    return str.__str__(text)


def _safe_type_name(err) -> str:
    name = _type_name(type(err))  # the C getter: a metaclass cannot run code here
    return name[:64] if name.isidentifier() else "Exception"


def encode_result(status: str, value) -> bytes:
    if value is None:
        text = "null"
    elif type(value) is float:
        text = _float_repr(value) if math.isfinite(value) else _encode_str(_float_repr(value))
    else:
        text = _encode_str(str.__str__(value))
    return ('{"status":%s,"value":%s}\n' % (_encode_str(status), text)).encode()


def child_main(jail: Jail, code: str, timeout_s: float, out_fd: int, result_fd: int,
               preloaded: dict):
    """Entry point of a forked child. Never returns."""
    try:
        jail.enter(out_fd, result_fd, timeout_s)
    except BaseException:
        _report_and_exit("error:SandboxSetup", None)
    os.environ.clear()  # nothing of the trainer's environment (tokens, paths) is visible
    status, value = run_program(code, fork_globals(preloaded))
    try:
        line = encode_result(status, value)
    except MemoryError:
        line = encode_result("memory", None)
    except BaseException as err:
        line = encode_result("error:" + _safe_type_name(err), None)
    _report_and_exit(line, None, raw=True)


def _report_and_exit(status_or_line, value, raw=False):
    try:
        _write(RESULT_FD, status_or_line if raw else encode_result(status_or_line, value))
    finally:
        _exit(0)


# Lines of the fast lane's executor (executor.py): "run this one in its own child", and "...
# and I am exiting: something changed what must not change" (see executor.py).
FORK_INSTEAD = b'{"fork":true}\n'
FORK_AND_RETIRE = b'{"fork":true,"retire":true}\n'

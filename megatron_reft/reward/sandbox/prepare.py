"""Setting up the zygote once: preloaded modules, an empty working directory, the jail its
children will enter, the limits it takes on itself, a warm-up, and the probe's self-checks.
Split from worker.py, which keeps the launcher and the serving loop."""
import fcntl
import os
import resource
import sys

from . import jail as jail_mod
from . import kernel, seccomp

PROGRAM_GLOBALS = ("math", "sympy")  # bound in every program, as the reference prepends them


def preload(names):
    """Import modules once, so no program pays for them (and they work even where the sandbox
    user cannot read the Python installation). Of these, the names the reference prepends as
    `import math` / `import sympy` are bound as globals of every program."""
    bound, errors = {}, {}
    for name in names:
        try:
            module = __import__(name)
        except Exception as err:  # e.g. sympy not installed: programs using it will fail
            errors[name] = repr(err)
            continue
        if name in PROGRAM_GLOBALS:
            bound[name] = module
    return bound, errors


_WARM_UP_PROGRAM = '''def solution():
    """Tom has 3 boxes of 12.5 apples; he eats 1/4 of them. How many are left?"""
    boxes = 3
    apples_per_box = 12.5
    total = boxes * apples_per_box
    eaten = total * 1 / 4
    remaining = [total - eaten for _ in range(2)][0]
    result = round(math.floor(remaining) + int("0") + max(0, -1), 2)
    return result
'''


def warm_up(preloaded):
    """Run the child's code path a few times in the zygote (our own program, not untrusted
    code), so the interpreter's compile/exec paths and allocator pools are mapped before any
    fork: measured 1.1 ms -> 0.25 ms of CPU for a child's compile + run (half the faults)."""
    for _ in range(20):
        status, value = jail_mod.run_program(_WARM_UP_PROGRAM, jail_mod.fork_globals(preloaded))
        jail_mod.encode_result(status, value)
        jail_mod.encode_result("error:ZeroDivisionError", "x")
        kernel.prctl_get(kernel.PR_GET_DUMPABLE)


def enter_empty_directory():
    """cwd = a directory that no longer exists: nothing in it can be listed or created, and
    nothing is left behind when the worker dies."""
    path = f"/tmp/megatron-reft-sandbox-{os.getpid()}-{os.urandom(6).hex()}"
    try:  # (not tempfile: it pulls in shutil, random and more, which every fork would copy)
        os.mkdir(path, 0o500)
        os.chdir(path)
        os.rmdir(path)
    except OSError:  # no writable /tmp: "/" is outside the readable allowlist anyway
        os.chdir("/")


def build_jail(cfg, namespaces):
    """The jail each child enters, the seccomp program for the zygote itself, and a
    description of what will be enforced (for the start-up log line)."""
    root_here = os.geteuid() == 0 and "user" not in namespaces
    info = {"seccomp_denied": 0, "seccomp_error": None, "landlock_abi": 0, "landlock_error": None}
    child_program = zygote_program = landlock_fd = None
    try:
        zygote_code, zygote_denied = seccomp.zygote_filter(kernel.machine())
        child_code, child_denied = seccomp.child_filter(kernel.machine())
        zygote_program = kernel.SeccompProgram(zygote_code)
        child_program = kernel.SeccompProgram(child_code)
        info["seccomp_denied"] = zygote_denied + child_denied
    except KeyError:
        info["seccomp_error"] = f"no syscall table for {kernel.machine()}"
    abi = kernel.landlock_abi()
    if not abi:
        info["landlock_error"] = "not supported by this kernel"
    else:
        try:
            landlock_fd = _high_fd(kernel.landlock_read_only_ruleset(abi, _readable_dirs()))
            info["landlock_abi"] = abi
        except OSError as err:
            info["landlock_error"] = str(err)
    jail = jail_mod.Jail(
        memory_mb=cfg["memory_mb"], sandbox_uid=cfg["sandbox_uid"] if root_here else None,
        nice=cfg["nice"], max_open_files=cfg["max_open_files"],
        devnull_fd=_high_fd(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)),
        seccomp_program=child_program, landlock_fd=landlock_fd)
    return jail, zygote_program, info


def restrict_zygote(jail, zygote_program, info):
    """Limits that suit the zygote too are applied once, here, and inherited by every child."""
    try:  # if the node runs out of memory, the kernel kills sandbox processes first
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
        info["oom_score_adj"] = 1000
    except OSError:
        info["oom_score_adj"] = None
    for limit in (resource.RLIMIT_FSIZE, resource.RLIMIT_CORE, resource.RLIMIT_MEMLOCK,
                  resource.RLIMIT_MSGQUEUE):
        resource.setrlimit(limit, (0, 0))  # lowering a limit always works
    if zygote_program is None:
        return
    try:
        kernel.prctl(kernel.PR_SET_NO_NEW_PRIVS, 1)
        zygote_program.install()
        info["seccomp_zygote"] = "ok"
    except OSError as err:  # then each child installs the whole denylist itself
        info["seccomp_zygote"] = f"failed: {err}"
        jail.seccomp_program = kernel.SeccompProgram(seccomp.full_filter(kernel.machine())[0])


def _high_fd(fd: int) -> int:
    """Move an fd the children inherit clear of 0-3, which they rearrange."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64)
    os.close(fd)
    return high


def _readable_dirs():
    """What a program may read: the Python installation (to import modules not preloaded)
    and system libraries. Not the project, the data, home directories or /proc."""
    paths = {os.path.dirname(os.__file__)}  # the standard library (not sysconfig: it would
    paths |= {p for p in sys.path               # add ~0.5 MB to every fork)
              if os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages")}
    paths |= {os.path.join(prefix, "lib") for prefix in (sys.prefix, sys.base_prefix)}
    paths |= {"/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib"}
    return sorted(p for p in paths if os.path.isdir(p))


def self_checks(_socket) -> dict:
    """Run inside the locked-down probe child: does what we claim actually hold?"""
    checks = {}

    def attempt(name, action):
        try:
            action()
            checks[name] = "ALLOWED"
        except OSError as err:
            checks[name] = f"denied ({type(err).__name__})"
        except RuntimeError as err:
            checks[name] = f"denied ({err})"

    def fork():
        if os.fork() == 0:
            os._exit(0)

    def connect():
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        try:
            sock.connect(("127.0.0.1", 9))
        finally:
            sock.close()

    def write_tmp():
        os.close(os.open("/tmp", os.O_TMPFILE | os.O_WRONLY, 0o600))  # leaves no file behind

    attempt("fork", fork)
    attempt("socket", lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).close())
    attempt("connect_loopback", connect)
    attempt("write_tmp", write_tmp)
    attempt("read_proc", lambda: os.close(os.open("/proc/self/status", os.O_RDONLY)))
    attempt("signal_parent", lambda: os.kill(os.getppid(), 0))
    # reading the parent's limit is harmless; the filter refuses any pid but the caller's
    attempt("limit_parent", lambda: resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE))
    return checks

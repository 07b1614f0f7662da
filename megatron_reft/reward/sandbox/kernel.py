"""Thin ctypes wrappers for the Linux isolation mechanisms the sandbox uses.

Python 3.11 has no os.unshare, no seccomp and no landlock bindings, and we want zero extra
dependencies, so this file speaks to libc directly. Everything here is a probe-able primitive:
callers try it, catch OSError, and report what is in force.

Mechanisms: namespaces (unshare), prctl flags, capabilities (capset), landlock, and a seccomp
filter assembled from the denylist in seccomp.py. Imports only the standard library: it is
loaded into the sandbox worker, whose size sets the cost of every fork.
"""
import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# Fixed argument types let plain ints through without building ctypes objects: these calls
# run after every fork, where each touched object costs a copy-on-write page fault.
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong)
_libc.prctl.restype = ctypes.c_int

# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def machine() -> str:
    """'x86_64' or 'aarch64' (the architectures seccomp.py has syscall tables for), else as is."""
    name = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name, name)


# ---- namespaces -------------------------------------------------------------------------------

def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def map_current_user() -> None:
    """After unshare(CLONE_NEWUSER): map our own uid/gid 1:1 so file ownership stays readable."""
    uid, gid = os.getuid(), os.getgid()
    with open("/proc/self/setgroups", "w") as f:  # required before an unprivileged gid_map
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


# ---- prctl and credentials --------------------------------------------------------------------

def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    result = _libc.prctl(option, arg2, arg3, 0, 0)
    return _check(result, f"prctl({option})") if result == -1 else result


def prctl_get(option: int) -> int:
    return prctl(option)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Clear every capability of this thread (used after unshare(CLONE_NEWUSER) granted a full
    set inside the new user namespace; the sandbox needs none of them)."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


# ---- seccomp ----------------------------------------------------------------------------------

class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompProgram:
    """A BPF program prepared once (in the worker) so installing it after each fork is a
    single prctl call on memory the child already has."""

    def __init__(self, code: bytes):
        assert len(code) % 8 == 0
        self._buffer = ctypes.create_string_buffer(code, len(code))
        self._fprog = _SockFprog(len(code) // 8, ctypes.addressof(self._buffer))
        self._fprog_address = ctypes.addressof(self._fprog)
        self.instructions = len(code) // 8

    def install(self) -> None:
        """Needs PR_SET_NO_NEW_PRIVS (or CAP_SYS_ADMIN) first; cannot be undone."""
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._fprog_address)


# ---- landlock ---------------------------------------------------------------------------------

_SYS_LANDLOCK_CREATE_RULESET = 444  # same number on x86_64 and aarch64
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP = 1 << 0
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's landlock ABI version, 0 when landlock is absent or disabled."""
    version = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def landlock_read_only_ruleset(abi: int, readable_dirs) -> int:
    """A ruleset fd that, once applied, allows reading files under `readable_dirs` and nothing
    else on the file system: no writes, creations, removals, renames or truncations anywhere.
    From ABI 4 it also denies TCP bind/connect, from ABI 6 signals and abstract unix sockets
    leaving the sandbox. Returns the fd; the caller keeps it for landlock_restrict_self."""
    fs_rights = next(r for v, r in sorted(_FS_RIGHTS_BY_ABI.items(), reverse=True) if abi >= v)
    attr = _RulesetAttr(fs_rights, 0, 0)
    size = 8
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    ruleset_fd = _check(int(_libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                                          ctypes.c_size_t(size), ctypes.c_uint32(0))),
                        "landlock_create_ruleset")
    try:
        for path in readable_dirs:
            path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneathAttr(FS_READ_FILE | FS_READ_DIR, path_fd)
                _check(int(_libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset_fd),
                                         ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH),
                                         ctypes.byref(rule), ctypes.c_uint32(0))),
                       f"landlock_add_rule({path})")
            finally:
                os.close(path_fd)
    except OSError:
        os.close(ruleset_fd)
        raise
    return ruleset_fd


def landlock_restrict_self(ruleset_fd: int) -> None:
    _check(int(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0)),
           "landlock_restrict_self")

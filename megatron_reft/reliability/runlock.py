"""One job per run directory: `<trainer.output_dir>/job.lock`, held by global rank 0.

The lock is an exclusive `flock` on the file, so the kernel releases it when the holder dies
(kill -9, node crash on a filesystem with lock recovery): a lock file left behind by a dead job
is stale and is taken over. The file's content says who holds it (host, PID, Slurm job id,
command, start time) for the refusal message. Where flock is unavailable (ENOLCK: some NFS
mounts) the content decides: a holder on this host whose PID is gone is stale.

A Slurm requeue of the same job (same SLURM_JOB_ID, possibly another host) takes over its own
earlier incarnation's lock even while the filesystem still shows it held.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from megatron_reft.reliability.errors import RunLockError
from megatron_reft.reliability.storage import naming

LOCK_NAME = "job.lock"


def _identity(job: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job": job,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "command": " ".join(sys.argv[:4]), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except (ValueError, OSError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "an unknown job"
    slurm = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"{holder.get('job', '?')} job PID {holder.get('pid', '?')} on {holder.get('host', '?')}"
            f"{slurm}, started {holder.get('started', '?')}")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # exists but not ours, or unreadable: assume alive


def holder_is_stale(holder: dict, me: dict) -> bool:
    """Without a kernel lock to ask: is the recorded holder certainly gone?"""
    if not holder:
        return True
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me.get("slurm_job_id"):
        return True  # our own job before a requeue
    return holder.get("host") == me["host"] and not _pid_alive(holder.get("pid"))


class RunLock:
    """Held for the life of the process; `release()` (also at exit) deletes the file."""

    def __init__(self, path: Path, fd: int, created_dir: bool):
        self.path, self.fd, self.created_dir = path, fd, created_dir
        atexit.register(self.release)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created_dir:  # a job that failed validation leaves no empty run directory behind
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


def acquire(output_dir: str | Path, job: str) -> RunLock:
    """Take the run directory or raise RunLockError naming the holder."""
    directory = Path(output_dir)
    created_dir = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    me = _identity(job)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read_holder(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):  # the kernel says: held by a live process
            stale = bool(holder.get("slurm_job_id")) and holder.get("slurm_job_id") == me["slurm_job_id"]
        else:  # no working locks here: judge by the recorded holder
            stale = holder_is_stale(holder, me)
        if not stale:
            os.close(fd)
            raise RunLockError(f"{directory}: run directory in use by {describe_holder(holder)} "
                               f"(lock {path}); use another trainer.output_dir or stop that job") from None
    lock = RunLock(path, fd, created_dir)
    try:
        with naming(path):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
    except OSError:  # e.g. disk full: give the directory back before reporting it
        lock.release()
        raise
    return lock

"""No helper process outlives a killed rank.

megatron's checkpoint writer keeps its results queue in a `multiprocessing.Manager` started
with "spawn": a server process plus a resource tracker, both re-parented to PID 1 and left
running when the rank is killed with SIGKILL (issue 11: 4 processes and ~0.5 GB per kill). The
queue is only ever read by the process that owns it (the save runs synchronously), so an
in-process `queue.Queue` does the same job without a helper process.

The writer's per-save worker processes (and any other `os.fork` child of a rank's main
thread: data-loader workers) get a parent-death signal, so they die with the rank instead of
finishing their work as orphans.
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import threading

PR_SET_PDEATHSIG = 1
_installed = False


def keep_checkpoint_writer_in_process() -> None:
    """Replace megatron's Manager-backed results queue by an in-process queue (idempotent)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()
        # its worker errors come back to us as exceptions and are reported in one line there
        logging.getLogger(filesystem_async.__name__).setLevel(logging.CRITICAL)
    install_parent_death_signal_for_forks()


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `sig` to this process when its parent thread
    exits. Linux only; False elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def install_parent_death_signal_for_forks() -> None:
    """Children forked by the main thread die with this process.

    Only main-thread forks: the signal fires when the forking *thread* exits, so a child forked
    by a short-lived helper thread would be killed early. exec'd subprocesses are not affected
    (subprocess does not run at-fork hooks).
    """
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    _installed = True
    forked_by_main = threading.local()

    def before():
        forked_by_main.value = threading.current_thread() is threading.main_thread()
        forked_by_main.parent = os.getpid()

    def after_in_child():
        if getattr(forked_by_main, "value", False):
            set_parent_death_signal()
            if os.getppid() != forked_by_main.parent:  # the parent died before prctl took hold
                os._exit(1)

    os.register_at_fork(before=before, after_in_child=after_in_child)


def die_with_launcher() -> None:
    """A rank started by torchrun dies when its launcher does (kill -9 of torchrun would
    otherwise leave the ranks training on as orphans, in their own sessions). SIGTERM: the
    same end as torchrun's own shutdown of its workers."""
    launcher = os.getppid()
    if set_parent_death_signal(signal.SIGTERM) and os.getppid() != launcher:
        os._exit(1)  # the launcher died before the signal was armed

"""Run a function on several local processes joined by torch.distributed (gloo by default).

    results = run_distributed(fn, 2, arg1, arg2, timeout_s=60)

spawns ``world_size`` processes; each gets MASTER_ADDR / MASTER_PORT (a free local port) /
RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE in its environment, optionally an initialised
default process group, and calls ``fn(rank, world_size, *args)``. The return values come back as
a list ordered by rank. A child's exception is re-raised in the calling (pytest) process with the
child's traceback: AssertionError stays AssertionError, anything else becomes RuntimeError. A rank
that dies without reporting, or a run that exceeds ``timeout_s``, raises too, and the remaining
ranks (which may be stuck in a collective) are terminated.

``fn`` and ``args`` must be picklable (``fn`` defined at module level), because processes are
started with "spawn": a fork of a process that already holds threads (torch, pytest) is unsafe.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable


def find_free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, init_process_group, backend, timeout_s, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch.distributed as dist

    try:
        if init_process_group:
            dist.init_process_group(
                backend, rank=rank, world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        value = fn(rank, world_size, *args)
        # Plain pickle copies tensors; the queue's own pickler would pass them through shared
        # memory, which breaks when this process exits before the parent reads them.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException as e:  # report everything, including SystemExit / KeyboardInterrupt
        kind = "assertion" if isinstance(e, AssertionError) else "error"
        results.put((rank, kind, traceback.format_exc()))
    finally:
        if init_process_group and dist.is_initialized():
            dist.destroy_process_group()


def _stop(processes, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    init_process_group: bool = True,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return the
    results ordered by rank. With ``init_process_group=False`` only the environment is set and
    ``fn`` initialises torch.distributed itself (e.g. through megatron's parallel state)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    processes = [
        ctx.Process(
            target=_child,
            args=(rank, world_size, port, fn, args, init_process_group, backend, timeout_s, results),
            name=f"run_distributed-rank{rank}",
        )
        for rank in range(world_size)
    ]
    for p in processes:
        p.start()

    values: dict[int, Any] = {}
    dead_since: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    ok = False
    try:
        while len(values) < world_size:
            try:
                rank, kind, payload = results.get(timeout=0.2)
            except queue.Empty:
                _check_progress(processes, values, dead_since, deadline, timeout_s)
                continue
            if kind == "assertion":
                raise AssertionError(f"rank {rank} of {world_size} failed an assertion:\n{payload}")
            if kind != "ok":
                raise RuntimeError(f"rank {rank} of {world_size} raised:\n{payload}")
            values[rank] = pickle.loads(payload)
        ok = True
    finally:
        _stop(processes, grace_s=10.0 if ok else 0.0)
    return [values[rank] for rank in range(world_size)]


def _check_progress(processes, values, dead_since, deadline, timeout_s) -> None:
    """Raise if a rank died without reporting (after a short grace period, since its last
    message may still be in the pipe) or if the whole run is past its deadline."""
    now = time.monotonic()
    for rank, p in enumerate(processes):
        if rank in values or p.exitcode is None:
            continue
        dead_since.setdefault(rank, now)
        if now - dead_since[rank] > 2.0:
            raise RuntimeError(
                f"rank {rank} exited with code {p.exitcode} without reporting a result "
                "(crashed or was killed; see its output above)"
            )
    if now > deadline:
        missing = [rank for rank in range(len(processes)) if rank not in values]
        raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s")

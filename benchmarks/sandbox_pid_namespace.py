"""What a pid namespace per program would cost (the alternative to the seccomp argument checks
that keep programs from acting on their siblings, docs/rewards.md "Isolation between
programs"): CPU and wall time per fork from a process the size of a light zygote, plain
against unshare(CLONE_NEWPID) + the second fork a new pid namespace needs for its init.
Needs root (or a user namespace). Prints one JSON object.

    python benchmarks/sandbox_pid_namespace.py [--forks 300]
"""
import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_reft.reward.sandbox import kernel, prepare  # noqa: E402
from megatron_reft.reward.sandbox.pool import DEFAULT_PRELOAD  # noqa: E402


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def plain_fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def fork_into_own_pid_namespace():
    pid = os.fork()
    if pid == 0:
        kernel.unshare(kernel.CLONE_NEWPID)
        init = os.fork()  # the first child after unshare is PID 1 of the new namespace
        if init == 0:
            os._exit(0)
        os.waitpid(init, 0)
        os._exit(0)
    os.waitpid(pid, 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forks", type=int, default=300)
    args = parser.parse_args(argv)
    prepare.preload(DEFAULT_PRELOAD)  # as big as the zygote that would fork
    results = {}
    ways = (("plain", plain_fork), ("own_pid_namespace", fork_into_own_pid_namespace))
    for name, fork in ways * 2:
        cpu, wall = cpu_seconds(), time.perf_counter()
        for _ in range(args.forks):
            fork()
        results.setdefault(name, []).append(
            {"cpu_ms": round((cpu_seconds() - cpu) / args.forks * 1e3, 3),
             "wall_ms": round((time.perf_counter() - wall) / args.forks * 1e3, 3)})
    print(json.dumps({"per_fork": results, "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()

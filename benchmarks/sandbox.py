"""Programs per second on the SVAMP P-CoT gold programs, three ways, in one run:

  (a) sandbox   - megatron_reft's SandboxPool with its defaults (warm workers; statically
                  pure programs share a jailed executor, the rest get one jailed fork each),
                  and again with the fast lane off (one jailed fork per program)
  (b) subprocess - a fresh `python -I` per program (the usual naive isolation), run
                   concurrently on all cores; measured twice: bare (no limits at all, the
                   cheapest possible fresh process) and sandboxed (the same jail as (a):
                   net+ipc namespaces, uid nobody, rlimits, landlock, seccomp - like for like)
  (c) in-process - exec() in this process, no isolation at all (the floor)

and, to weigh the design choice of forking per program, (d) a persistent worker per core
that exec()s every program in its own interpreter without forking (the alternative design:
no per-program isolation, and a timeout would cost a worker restart).

Prints one JSON object with the medians over --repeats and the ratios. Also checks every
program returned its gold answer (a fast sandbox that gets answers wrong is no use).

    python benchmarks/sandbox.py [--data ../shared/data/mwp_reft/svamp_python_sdp.json]
"""
import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_reft.reward.extract import extract_program  # noqa: E402
from megatron_reft.reward.sandbox.pool import SandboxConfig, SandboxPool  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "mwp_reft" / "svamp_python_sdp.json"
# What a fresh interpreter runs per program: the reference's semantics (math available,
# solution()'s return value), answer printed as JSON on stdout.
RUNNER = ("import sys, json, math\n"
          "ns = {'math': math}\n"
          "exec(compile(sys.stdin.read(), '<program>', 'exec'), ns)\n"
          "print(json.dumps(float(ns['solution']())))\n")


def cpu_seconds() -> float:
    """CPU time of this process and of all its waited-for descendants (workers, programs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_sandbox(programs, config):
    """Wall seconds for the batch, the values, and CPU seconds for everything (pool start-up
    and warm-up included: the workers' CPU is only accounted once they exit)."""
    cpu_start = cpu_seconds()
    with SandboxPool(config) as pool:
        pool.run(programs[:64])  # warm-up: workers started, pages faulted in
        start = time.perf_counter()
        results = pool.run(programs)
        seconds = time.perf_counter() - start
    return seconds, [r.value if r.status == "ok" else None for r in results], \
        cpu_seconds() - cpu_start


def run_subprocess(programs, timeout_s, workers, sandboxed=False):
    command = ([sys.executable, "-I", "-c", SANDBOXED_RUNNER, str(REPO)] if sandboxed
               else [sys.executable, "-I", "-c", RUNNER])

    def one(code):
        proc = subprocess.run(command, input=code, text=True, capture_output=True,
                              timeout=timeout_s + 5, env={})
        if proc.returncode != 0:
            return None
        answer = json.loads(proc.stdout)
        return answer["value"] if sandboxed else answer

    cpu_start = cpu_seconds()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        values = list(pool.map(one, programs))
    return time.perf_counter() - start, values, cpu_seconds() - cpu_start


# (b) sandboxed: the fresh interpreter builds and enters the same jail as a sandbox child.
SANDBOXED_RUNNER = """
import os, sys
sys.path.insert(0, sys.argv[1])
from megatron_reft.reward.sandbox import jail, kernel, prepare
kernel.unshare(kernel.CLONE_NEWNET | kernel.CLONE_NEWIPC)
code = sys.stdin.read()
preloaded, _ = prepare.preload(["math"])
prepare.enter_empty_directory()
cfg = {"memory_mb": 512, "sandbox_uid": 65534, "nice": 0, "max_open_files": 64}
the_jail, zygote_filter, info = prepare.build_jail(cfg, ["net", "ipc"])
output_fd, result_fd = os.open(os.devnull, os.O_WRONLY), os.dup(1)
prepare.restrict_zygote(the_jail, zygote_filter, info)
the_jail.enter(output_fd, result_fd, 2.0)
status, value = jail.run_program(code, jail.fork_globals(preloaded))
os.write(jail.RESULT_FD, jail.encode_result(status, value))
"""


LOOP_RUNNER = ("import sys, json, math\n"
               "for line in sys.stdin:\n"
               "    ns = {'math': math}\n"
               "    exec(compile(json.loads(line), '<program>', 'exec'), ns)\n"
               "    print(json.dumps(float(ns['solution']())), flush=True)\n")


def run_persistent_workers(programs, workers):
    procs = [subprocess.Popen([sys.executable, "-I", "-c", LOOP_RUNNER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={}) for _ in range(workers)]

    def serve(proc, chunk):
        out = []
        for code in chunk:  # one program in flight per worker, as a timeout would require
            proc.stdin.write(json.dumps(code) + "\n")
            proc.stdin.flush()
            out.append(json.loads(proc.stdout.readline()))
        return out

    chunks = [programs[i::workers] for i in range(workers)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        serve(procs[0], programs[:10])  # started
        start = time.perf_counter()
        parts = list(pool.map(serve, procs, chunks))
        seconds = time.perf_counter() - start
    for proc in procs:
        proc.stdin.close()
        proc.wait()
    values = [None] * len(programs)
    for i, part in enumerate(parts):
        values[i::workers] = part
    return seconds, values


def run_in_process(programs):
    start = time.perf_counter()
    values = []
    for code in programs:
        namespace = {"math": math}
        exec(compile(code, "<program>", "exec"), namespace)
        values.append(float(namespace["solution"]()))
    return time.perf_counter() - start, values


def count_wrong(values, golds):
    return sum(v is None or isinstance(v, str) or abs(v - g) > 1e-2 for v, g in zip(values, golds))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--subprocess-limit", type=int, default=600,
                        help="programs for (b): a fresh interpreter each is slow")
    args = parser.parse_args(argv)

    items = json.load(open(args.data))
    programs = [extract_program(item["answer_cot"]) for item in items]
    golds = [float(item["answer_value"].replace(",", "")) for item in items]
    config = SandboxConfig(num_workers=args.workers)
    few = programs[:args.subprocess_limit]

    rates = {"sandbox": [], "sandbox_fork_only": [], "subprocess": [],
             "subprocess_sandboxed": [], "in_process": [], "persistent_worker": []}
    cpu_ms = {"sandbox": [], "sandbox_fork_only": [], "subprocess": [],
              "subprocess_sandboxed": []}  # CPU per program, all processes involved
    wrong = {}
    fork_only = dataclasses.replace(config, fast_path_budget_s=0)
    for _ in range(args.repeats):
        for name, cfg in (("sandbox", config), ("sandbox_fork_only", fork_only)):
            seconds, values, cpu = run_sandbox(programs, cfg)
            rates[name].append(len(programs) / seconds)
            cpu_ms[name].append(1e3 * cpu / (len(programs) + 64))
            wrong[name] = count_wrong(values, golds)
        for name, sandboxed in (("subprocess", False), ("subprocess_sandboxed", True)):
            seconds, values, cpu = run_subprocess(few, config.timeout_s, args.workers, sandboxed)
            rates[name].append(len(few) / seconds)
            cpu_ms[name].append(1e3 * cpu / len(few))
            wrong[name] = count_wrong(values, golds)
        seconds, values = run_in_process(programs)
        rates["in_process"].append(len(programs) / seconds)
        wrong["in_process"] = count_wrong(values, golds)
        seconds, values = run_persistent_workers(programs, args.workers)
        rates["persistent_worker"].append(len(programs) / seconds)
        wrong["persistent_worker"] = count_wrong(values, golds)

    median = {name: statistics.median(values) for name, values in rates.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_ms.items()}
    print(json.dumps({
        "programs": len(programs), "subprocess_programs": len(few), "repeats": args.repeats,
        "cpus": os.cpu_count(), "workers": args.workers, "python": platform.python_version(),
        "programs_per_s": {k: round(v, 1) for k, v in median.items()},
        "all_runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "sandbox_vs_subprocess": round(median["sandbox"] / median["subprocess"], 1),
        "sandbox_fork_only_vs_subprocess": round(median["sandbox_fork_only"]
                                                 / median["subprocess"], 1),
        "sandbox_vs_subprocess_sandboxed": round(median["sandbox"]
                                                 / median["subprocess_sandboxed"], 1),
        "in_process_vs_sandbox": round(median["in_process"] / median["sandbox"], 1),
        "persistent_worker_vs_sandbox": round(median["persistent_worker"] / median["sandbox"], 1),
        # Less sensitive to other load than wall-clock rates: CPU per program, and the rate
        # that implies when all cores are ours.
        "cpu_ms_per_program": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_bound_programs_per_s": {k: round(1e3 * os.cpu_count() / v, 1) for k, v in cpu.items()},
        # (the sandbox's CPU includes starting its workers, which shows at these speeds)
        "sandbox_vs_subprocess_by_cpu": round(cpu["subprocess"] / cpu["sandbox"], 1),
        "sandbox_fork_only_vs_subprocess_by_cpu": round(cpu["subprocess"]
                                                        / cpu["sandbox_fork_only"], 1),
        "sandbox_vs_subprocess_sandboxed_by_cpu": round(cpu["subprocess_sandboxed"]
                                                        / cpu["sandbox"], 1),
        "wrong_answers": wrong,
        "load_average": os.getloadavg(),
    }, indent=1))


if __name__ == "__main__":
    main()

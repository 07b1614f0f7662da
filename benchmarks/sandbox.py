"""Programs per second on the SVAMP P-CoT gold programs, three ways, in one run:

  (a) sandbox   - megatron_reft's SandboxPool (warm workers, one jailed fork per program)
  (b) subprocess - a fresh `python -I` per program (the usual naive isolation), run
                   concurrently on all cores
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
import json
import math
import os
import platform
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


def run_sandbox(programs, config):
    with SandboxPool(config) as pool:
        pool.run(programs[:64])  # warm-up: workers started, pages faulted in
        start = time.perf_counter()
        results = pool.run(programs)
        seconds = time.perf_counter() - start
    return seconds, [r.value if r.status == "ok" else None for r in results]


def run_subprocess(programs, timeout_s, workers):
    def one(code):
        proc = subprocess.run([sys.executable, "-I", "-c", RUNNER], input=code, text=True,
                              capture_output=True, timeout=timeout_s + 5, env={})
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        values = list(pool.map(one, programs))
    return time.perf_counter() - start, values


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

    rates = {"sandbox": [], "subprocess": [], "in_process": [], "persistent_worker": []}
    wrong = {}
    for _ in range(args.repeats):
        seconds, values = run_sandbox(programs, config)
        rates["sandbox"].append(len(programs) / seconds)
        wrong["sandbox"] = count_wrong(values, golds)
        seconds, values = run_subprocess(few, config.timeout_s, args.workers)
        rates["subprocess"].append(len(few) / seconds)
        wrong["subprocess"] = count_wrong(values, golds)
        seconds, values = run_in_process(programs)
        rates["in_process"].append(len(programs) / seconds)
        wrong["in_process"] = count_wrong(values, golds)
        seconds, values = run_persistent_workers(programs, args.workers)
        rates["persistent_worker"].append(len(programs) / seconds)
        wrong["persistent_worker"] = count_wrong(values, golds)

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(json.dumps({
        "programs": len(programs), "subprocess_programs": len(few), "repeats": args.repeats,
        "cpus": os.cpu_count(), "workers": args.workers, "python": platform.python_version(),
        "programs_per_s": {k: round(v, 1) for k, v in median.items()},
        "all_runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "sandbox_vs_subprocess": round(median["sandbox"] / median["subprocess"], 1),
        "in_process_vs_sandbox": round(median["in_process"] / median["sandbox"], 1),
        "persistent_worker_vs_sandbox": round(median["persistent_worker"] / median["sandbox"], 1),
        "wrong_answers": wrong,
        "load_average": os.getloadavg(),
    }, indent=1))


if __name__ == "__main__":
    main()

"""Isolation *between* programs (issue 10): no program can change another program's answer
or status - not through the fast lane's shared executor (scoping tricks past the static
check, rebinding builtins or math, the executor's own encoder), not by acting on sibling
processes (rlimits, priority, scheduling), and not by knocking the fast lane out."""
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_reft.reward import RewardConfig, RewardScorer
from megatron_reft.reward.sandbox.pool import SandboxConfig, SandboxPool
from megatron_reft.reward.sandbox.purity import is_pure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")


def program(body: str) -> str:
    return "def solution():\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ")


# What a hostile program would do once it has a real builtin in hand (all return 42: the gold
# answer of a probe would never be 42, and a hostile program must never score).
_ENCODER_42 = ("__import__('sys').modules['megatron_reft.reward.sandbox.jail'].__dict__"
               ".__setitem__('encode_result', lambda s, v: b'{\"status\":\"ok\",\"value\":42}\\n')")
_ROUND_42 = "__import__('builtins').__dict__.__setitem__('round', lambda *a: 42)"
_EXIT = "__import__('os')._exit(0)"

# name -> program. Each is rejected by the static check (see test_hostile_programs_are_not_pure)
# or contained (runs, but only on its own fresh globals).
HOSTILE = {
    # comprehension variables are a scope of their own: the later use is the real builtin
    "listcomp_setattr": program("[setattr for setattr in ()]\nsetattr(math, 'pi', 3)\nreturn 42"),
    "setcomp_eval_round": program(f"{{eval for eval in ()}}\neval({_ROUND_42!r})\nreturn 42"),
    "dictcomp_eval_encoder": program(f"{{eval: 1 for eval in ()}}\neval({_ENCODER_42!r})\n"
                                     "return 42"),
    "genexp_setattr": program("list(setattr for setattr in ())\nsetattr(math, 'sqrt', abs)\n"
                              "return 42"),
    "nested_comprehension": program(f"[[0 for eval in ()] for _ in ()]\neval({_ROUND_42!r})\n"
                                    "return 42"),
    "comprehension_outer_iterable": program("[0 for setattr in (setattr(math, 'e', 3),)]\n"
                                            "return 42"),
    "walrus_in_comprehension": program("[(s := setattr) for _ in (1,)]\ns(math, 'tau', 3)\n"
                                       "return 42"),
    "walrus_binds_outer_name": program("x = [(setattr := 1) for _ in ()]\nreturn setattr"),
    "comprehension_open": program("[open for open in ()]\nopen('/tmp/reft_isolation', 'w')\n"
                                  "return 42"),
    "comprehension_exit": program(f"[eval for eval in ()]\neval({_EXIT!r})\nreturn 42"),
    "math_shadowed_in_comprehension": program("return [math.pi for math in [0]]"),
    "module_level_alias": "from math import pi as round\n" + program("return round"),
    "default_argument": program("f = lambda s=setattr: s(math, 'pi', 3)\nf()\nreturn 42"),
    "nested_def_default": program("def f(s=setattr):\n    s(math, 'pi', 3)\nf()\nreturn 42"),
    "format_attributes": program("return '{0.__class__.__base__.__subclasses__}'.format(1)"),
    "str_format_method": program("return str.format('{0.real}', 41)"),
    "generator_frame": program("g = (x for x in (1,))\n"
                               "g.gi_frame.f_back.f_globals['math'].pi = 3\nreturn 42"),
    "traceback_frames": program("try:\n    1 / 0\nexcept Exception as e:\n"
                                "    e.__traceback__.tb_frame.f_globals['math'].pi = 3\n"
                                "return 42"),
    "class_body": program("class A:\n    setattr(math, 'pi', 3)\nreturn 42"),
    "decorator": "@print\n" + program("return 42"),
    "decorated_inner": program("@setattr\ndef f():\n    pass\nreturn 42"),
    "dunder_builtins": program("__builtins__.round = len\nreturn 42"),
    "sys_modules_math": program("import sys\nsys.modules['math'].pi = 3\nreturn 42"),
    "math_attribute_store": program("math.pi = 3\nreturn 42"),
}

PROBES = [  # pure programs whose answers the hostile ones above try to change
    (program("return math.pi"), math.pi),
    (program("return math.e + math.tau + math.sqrt(4)"), math.e + math.tau + 2),
    (program("return round(2.567, 2)"), 2.57),
    (program("a = 29\nb = 7\nreturn a * b"), 203.0),
    (program("return sum([1, 2, 3]) + int('4') + len([0, 0])"), 12.0),
    ("from math import floor\n" + program("return floor(7.5) + math.floor(1.5)"), 8.0),
]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_are_not_pure_or_harmless(name):
    contained = {"walrus_binds_outer_name", "module_level_alias"}  # run, on their own globals
    assert is_pure(HOSTILE[name]) == (name in contained)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(SandboxConfig(num_workers=1, timeout_s=2.0)) as pool:
        yield pool  # one worker: every pure program passes through the same executor


def probe_batch():
    return [code for code, _ in PROBES], [value for _, value in PROBES]


def test_honest_programs_after_hostile_ones_get_their_own_answers(pool):
    codes, expected = probe_batch()
    batch, probe_positions = [], []
    for hostile in HOSTILE.values():
        batch.append(hostile)
        probe_positions.append(len(batch))
        batch += codes
    results = pool.run(batch)
    for position in probe_positions:
        got = [(r.status, r.value) for r in results[position:position + len(codes)]]
        assert got == [("ok", pytest.approx(v)) for v in expected], batch[position - 1]
    # ... and in the next batch, through the same (long-lived) executor
    for _ in range(2):
        assert [(r.status, r.value) for r in pool.run(codes * 10)] == \
            [("ok", pytest.approx(v)) for v in expected * 10]


def test_contained_programs_run_with_their_own_globals(pool):
    results = pool.run([HOSTILE["walrus_binds_outer_name"], HOSTILE["module_level_alias"],
                        PROBES[2][0]])
    assert [r.status for r in results] == ["error:UnboundLocalError", "ok", "ok"]
    assert [r.value for r in results[1:]] == [math.pi, 2.57]


# ---- siblings: acting on other processes ------------------------------------------------

SABOTAGE = program("""
    import os, resource, ctypes, platform
    libc = ctypes.CDLL(None, use_errno=True)
    ioprio_set = {"x86_64": 251, "aarch64": 30}.get(platform.machine())
    attacks = [
        lambda pid: resource.prlimit(pid, resource.RLIMIT_CPU, (0, 0)),
        lambda pid: resource.prlimit(pid, resource.RLIMIT_AS, (1 << 20, 1 << 20)),
        lambda pid: os.setpriority(os.PRIO_PROCESS, pid, 19),
        lambda pid: os.sched_setaffinity(pid, {0}),
        lambda pid: os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0)),
        lambda pid: os.sched_setparam(pid, os.sched_param(0)),
    ]
    hits = 0
    for pid in range(1, 400):
        if pid == os.getpid():
            continue
        for attack in attacks:
            try:
                attack(pid)
                hits += 1
            except OSError:
                pass
        if ioprio_set and libc.syscall(ioprio_set, 1, pid, (3 << 13) | 7) == 0:
            hits += 1
    for whole_group in (lambda: os.setpriority(os.PRIO_USER, 0, 19),
                        lambda: os.setpriority(os.PRIO_PGRP, 0, 19)):
        try:
            whole_group()
            hits += 1
        except OSError:
            pass
    return hits""")
BUSY_HONEST = program("""
    import time
    start = time.monotonic()
    while time.monotonic() - start < 0.8:
        pass
    return 42""")
OWN_LIMITS = program("""
    import os, resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    resource.prlimit(0, resource.RLIMIT_CORE, (0, 0))
    os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + 1)
    os.sched_setaffinity(0, os.sched_getaffinity(0))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]""")


def test_sibling_sabotage_changes_no_concurrent_program(pool):
    pure = [code for code, _ in PROBES] * 20
    batch = [BUSY_HONEST] * 3 + [SABOTAGE] + pure + [BUSY_HONEST] * 3 + [SABOTAGE, OWN_LIMITS]
    results = pool.run(batch, timeout_s=5.0)
    by_kind = {"busy": [r for code, r in zip(batch, results) if code == BUSY_HONEST],
               "sabotage": [r for code, r in zip(batch, results) if code == SABOTAGE]}
    assert [(r.status, r.value) for r in by_kind["busy"]] == [("ok", 42.0)] * 6
    assert [(r.status, r.value) for r in by_kind["sabotage"]] == [("ok", 0.0)] * 2  # no hits
    assert [(r.status, r.value) for r in results[4:4 + len(pure)]] == \
        [("ok", pytest.approx(v)) for _, v in PROBES] * 20
    assert (results[-1].status, results[-1].value) == ("ok", 32.0)  # its own: still allowed
    assert pool.isolation["checks"]["limit_parent"].startswith("denied")  # the start-up probe


# ---- the fast lane keeps serving -------------------------------------------------------

KILLERS = [program(f"[eval for eval in ()]\neval({_EXIT!r})\nreturn 42"),
           program(f"[exec for exec in ()]\nexec({_EXIT!r})\nreturn 42"),
           program(f"{{eval for eval in ()}}\neval({_EXIT!r})\nreturn 42")]
HONEST = [program(f"a = {i}\nb = {i % 7 + 1}\nreturn a * b + round(math.sqrt(b), 3)")
          for i in range(1000)]
HONEST_VALUES = [i * (i % 7 + 1) + round(math.sqrt(i % 7 + 1), 3) for i in range(1000)]


def test_executor_killers_do_not_slow_honest_programs():
    """Three programs that would kill a fresh executor before it serves anything, then 1,000
    honest ones: same answers, and at most 2x the time of the same batch in a clean pool.
    Best of three, alternating between the two pools, so that a load spike on a shared
    machine hits both."""
    config = SandboxConfig(num_workers=1, timeout_s=2.0)
    with SandboxPool(config) as clean_pool, SandboxPool(config) as attacked_pool:
        clean_pool.run(HONEST[:100])
        clean, attacked = [], []
        for _ in range(3):
            clean.append(timed_honest_run(clean_pool, []))
            attacked.append(timed_honest_run(attacked_pool, KILLERS))
    assert min(attacked) < 2 * min(clean), (clean, attacked)


def timed_honest_run(pool, first):
    start = time.perf_counter()
    results = pool.run(first + HONEST)
    seconds = time.perf_counter() - start
    assert [r.status for r in results[:len(first)]] == ["killed"] * len(first)
    assert [r.value for r in results[len(first):]] == pytest.approx(HONEST_VALUES)
    return seconds


# ---- everything at once ------------------------------------------------------------------

def test_svamp_gold_programs_interleaved_with_every_hostile_program_score_one(shared_data):
    svamp = shared_data / "mwp_reft" / "svamp_python_sdp.json"
    if not svamp.is_file():
        pytest.skip(f"SVAMP data not found at {svamp}")
    from test_sandbox import hostile_programs, marker_files, processes_with, \
        sandbox_descendants, sandbox_owned_files
    items = json.loads(svamp.read_text())
    hostile = list(HOSTILE.values()) + list(hostile_programs(port=9).values())
    others, owned_before = set(sandbox_descendants()), sandbox_owned_files()
    responses, golds, gold_positions = [], [], []
    spacing = max(1, len(items) // len(hostile))
    for index, item in enumerate(items):  # hostile programs spread through the whole batch
        if index % spacing == 0 and index // spacing < len(hostile):
            responses.append(hostile[index // spacing])
            golds.append("42")
        gold_positions.append(len(responses))
        responses.append(item["answer_cot"])
        golds.append(str(item["answer_value"]))
    scorer = RewardScorer(RewardConfig(cot_type="pcot", timeout_s=2.0, num_workers=2))
    try:
        results = scorer.score(responses, golds, ["number"] * len(responses))
        tag = f'"pool": "{scorer.sandbox.tag}"'
    finally:
        scorer.close()
    wrong = [(i, results[i]) for i in gold_positions if results[i].reward != 1.0]
    assert wrong == [] and len(gold_positions) == len(items)
    deadline = time.monotonic() + 10
    while (processes_with(tag) or set(sandbox_descendants()) - others) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(tag) == [] and set(sandbox_descendants()) - others == set()
    assert marker_files() == [] and sandbox_owned_files() - owned_before == set()
    assert not Path("/tmp/reft_isolation").exists()

"""The fast lane: which programs may share the jailed executor (purity.py), and that sharing
never changes an answer - slow, crashing or memory-hungry pure programs fall back to their
own fork, and nothing one program does is seen by the next."""
import math
import sys
import time

import psutil
import pytest

from megatron_reft.reward.sandbox.pool import SandboxConfig, SandboxPool
from megatron_reft.reward.sandbox.purity import is_pure

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")


def program(*lines):
    return "def solution():\n" + "\n".join("    " + line for line in lines)


PURE = [
    program('"""docstring"""', "a = 29", "b = 7", "result = a * b", "return result"),
    program("x = [0, 1, 2]", "x[0] = 5", "return sum(x) + max(x) - len(x)"),
    program("return sorted([3, 1], key=abs)[0] + round(2.567, 2) + int('5')"),
    program("from math import sqrt", "return sqrt(16) + math.floor(2.5) + math.pi"),
    program("total = 0", "for i in range(10):", "    if i % 2:", "        total += i",
            "return total"),
    program("while True:", "    pass"),
    program("return [i * i for i in range(5)][-1]"),
    "import math\n" + program("return math.gcd(12, 18)"),
]
IMPURE = [
    program("math.pi = 3", "return 1"),                     # attribute store
    program("import os", "return 1"),                       # other modules
    program("x = [1]", "x.append(2)", "return x"),          # methods of objects
    program("return globals()"),                            # not an allowed builtin
    program("return __builtins__"),                         # dunder names
    program("def f():", "    return 1", "return f()"),      # nested functions
    program("return (lambda: 1)()"),
    program("return solution()"),                           # recursion
    program("return f'{1}'"),                               # formatting hooks
    program("return [*range(3)]"),
    program("return math.__dict__"),
    program("return print(1)"),
    program("return '{}'.format(1)"),
    program("return type(1)"),
    program("return dict(**{})"),
    program("math = [1]", "math.append(2)", "return 1"),     # math rebound: not the module
    program("from math import floor as math", "return math.__name__"),
    program("import math as m", "return m.pi"),
    program("global x", "x = 1", "return x"),
    program("try:", "    return 1", "except Exception:", "    return 2"),
    "x = 1\n" + program("return 1"),                        # module-level statements
    "def solution(a):\n    return a",                       # arguments
    program("return (") + "x",                              # syntax error
]


@pytest.mark.parametrize("code", PURE)
def test_pure_programs(code):
    assert is_pure(code)


@pytest.mark.parametrize("code", IMPURE)
def test_impure_programs(code):
    assert not is_pure(code)


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(SandboxConfig(num_workers=1, timeout_s=1.0)) as pool:
        yield pool


def executor_pids(pool):
    """Live children of the zygote between batches: its executor (killed or retired ones may
    linger a moment as zombies until the zygote reaps them)."""
    zygote = psutil.Process(pool._workers[0].proc.pid).children()[0]
    deadline = time.monotonic() + 5
    while True:
        children = zygote.children()
        if all(c.status() != psutil.STATUS_ZOMBIE for c in children) or \
                time.monotonic() > deadline:
            return {c.pid for c in children if c.status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.02)


def test_answers_match_the_fork_path():
    with SandboxPool(SandboxConfig(num_workers=1, fast_path_budget_s=0)) as fork_only:
        expected = fork_only.run(PURE[:5] + PURE[6:])
    with SandboxPool(SandboxConfig(num_workers=1)) as fast:
        assert fast.run(PURE[:5] + PURE[6:]) == expected
    assert [r.value for r in expected][:2] == [203.0, 10.0]
    assert expected[3].value == pytest.approx(4 + 2 + math.pi)


def test_nothing_leaks_from_one_program_to_the_next(pool):
    poison = [program("math.pi = 3", "return math.pi"),             # forked: its own copy
              program("import builtins", "builtins.round = len", "return 1")]
    probes = [program("return math.pi"), program("return round(2.4)")]
    results = pool.run(poison + probes * 20)
    assert results[0].value == 3.0 and results[1].value == 1.0
    assert {r.value for r in results[2::2]} == {math.pi}
    assert {r.value for r in results[3::2]} == {2.0}


def test_slow_and_hungry_pure_programs_fall_back_to_their_own_fork(pool):
    start = time.monotonic()
    results = pool.run([
        program("while True:", "    pass"),                 # over the budget, then timeout
        program("return 10 ** 10 ** 10"),                   # stuck in C: same
        program("x = [0] * 10 ** 10", "return 1"),          # MemoryError: retried in a fork
        program("return 1 / 0"),                            # deterministic: answered at once
        program("s = 0", "for i in range(3 * 10 ** 6):", "    s += i", "return s"),
    ])
    elapsed = time.monotonic() - start
    statuses = [r.status for r in results]
    # MemoryError is immediate; "timeout" only if a load spike stalls the retry's fork for 1 s
    assert statuses[2] in ("memory", "timeout")
    assert statuses[:2] + statuses[3:] == ["timeout", "timeout", "error:ZeroDivisionError", "ok"]
    assert results[4].value == float(sum(range(3 * 10 ** 6)))  # slow but right, via a fork
    assert elapsed < 1.0 + 0.05 * 5 + 3.0, elapsed


def test_executor_is_reused_and_replaced_when_killed(pool):
    pool.run([PURE[0]] * 5)
    first = executor_pids(pool)
    pool.run([PURE[0]] * 5)
    assert executor_pids(pool) == first and len(first) == 1  # one long-lived executor
    for pid in first:
        psutil.Process(pid).kill()
    results = pool.run([PURE[0]] * 20)
    assert [r.value for r in results] == [203.0] * 20
    assert executor_pids(pool) - first  # a new one

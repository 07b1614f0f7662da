"""The fast lane's executor and its bookkeeping, driven directly (a real forked executor,
no worker): what holds even if a program got past the static check - fresh globals with only
pure builtins, tampering detected and the program re-run forked - and the back-off after
executors die before serving anything."""
import ast
import math
import os
import select
import signal
import sys
import time

import pytest

from megatron_reft.reward.sandbox import executor, fastpath, jail as jail_mod, purity
from megatron_reft.reward.sandbox.fastpath import FastLane
from megatron_reft.reward.sandbox.worker import verdict_for

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")


class TestJail(jail_mod.Jail):
    """No lockdown (this is about the lane, not the kernel jail); fails to be entered while
    `failures_left` > 0, as a jail that cannot be entered or a program killing it at once."""
    __test__ = False

    def __init__(self, failures=0):
        super().__init__(memory_mb=512, sandbox_uid=None, nice=0, max_open_files=64,
                         devnull_fd=os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        self.enabled = set()
        self.failures_left = failures

    def enter(self, out_fd, result_fd, timeout_s, report=None, stdin_fd=None):
        if self.failures_left > 0:
            raise OSError("cannot enter")
        super().enter(out_fd, result_fd, timeout_s, report, stdin_fd)


class Harness:
    """Plays the zygote's part around one FastLane: feeds it, reads, reaps."""

    def __init__(self, jail):
        self.jail, self.poller = jail, select.poll()
        self.forked, self.answers, self.exit_codes, self.started = [], {}, [], []
        # a generous budget: under heavy load a budget kill would look like a wrong fork
        self.lane = FastLane(jail, self.poller, budget_s=30.0,
                             max_programs=10 ** 6, reply=self._reply,
                             fork=lambda request: self.forked.append(request[0]),
                             verdict=verdict_for)
        start = self.lane._start

        def counted_start():
            start()  # the child has forked with the jail as it is now
            self.started.append(self.lane.pid)
            self.jail.failures_left -= 1
        self.lane._start = counted_start

    def _reply(self, rid, status, value):
        self.answers[rid] = (status, value)

    def run(self, codes):
        first = len(self.forked) + len(self.answers)
        for offset, code in enumerate(codes):
            self.lane.submit((first + offset, code, 30.0))
        deadline = time.monotonic() + 120
        while len(self.forked) + len(self.answers) < first + len(codes):
            assert time.monotonic() < deadline, "the lane stopped answering"
            self.lane.feed()
            for fd, _ in self.poller.poll(20):
                if fd == self.lane.reply_fd:
                    self.lane.on_readable()
            self._reap()
            self.lane.enforce(time.monotonic())
        return first

    def _reap(self):
        for pid in list(self.started):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.started.remove(pid)
                self.exit_codes.append(os.waitstatus_to_exitcode(status))
                self.lane.on_exit(pid)

    def close(self):
        self.lane._close_pipes()  # EOF: the executor exits
        deadline = time.monotonic() + 10
        while self.started and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)


def value_program(i):
    return f"def solution():\n    return {i} * 2 + round(math.pi, 2)"


def test_lane_backs_off_and_serves_again_after_executors_die():
    harness = Harness(TestJail(failures=3))
    try:
        harness.run([value_program(i) for i in range(300)])
    finally:
        harness.close()
    bounded = fastpath.DEATHS_BEFORE_PAUSE + fastpath.PAUSE_PROGRAMS[0]
    # at most the heads of 3 dead executors (one may die before it was given a program) and
    # the pause fork; everything after that the executor serves again
    forked = len(harness.forked)
    assert harness.forked == list(range(forked)) and bounded - 1 <= forked <= bounded
    assert harness.answers == {i: ("ok", i * 2 + 3.14) for i in range(forked, 300)}
    assert harness.lane.deaths_in_a_row == 0 and harness.lane.paused_for == 0


SUBCLASS_ESCAPE = '''def solution():
    for c in ().__class__.__base__.__subclasses__():
        init = c.__init__
        if init.__class__.__name__ == "function" and "sys" in init.__globals__:
            modules = init.__globals__["sys"].modules
            {action}
            return 1
    return 0
'''
TAMPERING = {name: SUBCLASS_ESCAPE.format(action=action) for name, action in {
    "math": 'modules["math"].pi = 3',
    "builtins": 'modules["builtins"].round = len',
    "encoder": ('modules["megatron_reft.reward.sandbox.jail"].encode_result = '
                'lambda status, value: b\'{"status":"ok","value":42}\\n\''),
    "purity_walk": 'modules["ast"].Name._fields = ()',
    "function_code": 'modules["megatron_reft.reward.sandbox.jail"]'
                     '.to_plain.__code__ = (lambda value: 42.0).__code__',
}.items()}
# a running generator's frame leads to the caller's caller: run_program, in jail.py
TAMPERING["generator_frame"] = '''def solution():
    g = (g.gi_frame.f_back.f_back.f_globals for _ in [1])
    jail_globals = list(g)[0]
    jail_globals["to_plain"] = lambda value: 42.0
    return 1
'''
PROBES = ["def solution():\n    return math.pi", "def solution():\n    return round(2.567, 2)",
          "def solution():\n    return 6 * 7 + 0.5"]
PROBE_ANSWERS = [("ok", math.pi), ("ok", 2.57), ("ok", 42.5)]


@pytest.fixture
def no_static_check(monkeypatch):
    """Every program is admitted: what follows must hold on the executor's own guards."""
    monkeypatch.setattr(purity, "pure_tree", ast.parse)


@pytest.mark.parametrize("target", sorted(TAMPERING))
def test_tampering_is_detected_and_the_program_reruns_forked(no_static_check, target):
    harness = Harness(TestJail())
    tamper = TAMPERING[target]
    try:
        first = harness.run(PROBES + [tamper] + PROBES * 3)
        harness.run(PROBES)  # the next batch
    finally:
        harness.close()
    tamper_id = first + len(PROBES)
    assert harness.forked == [tamper_id]  # its answer is not trusted: it runs again alone
    answers = [harness.answers[i] for i in sorted(harness.answers)]
    assert answers == [(s, pytest.approx(v)) for s, v in PROBE_ANSWERS * 5]
    # it exits by itself on detection; the lane also SIGKILLs it (whichever comes first),
    # and the probes after it were served by a second executor
    assert len(harness.exit_codes) == 2
    assert harness.exit_codes[0] in (executor.TAMPERED_EXIT, -signal.SIGKILL)


def test_programs_get_fresh_globals_with_pure_builtins_only(no_static_check):
    harness = Harness(TestJail())
    programs = ["def solution():\n    return setattr",
                "def solution():\n    import os\n    return 1",
                "def solution():\n    math.pi = 3\n    return math.pi",
                "def solution():\n    return __builtins__['__import__'].__globals__['make_import']"
                ".__globals__.get('os', 'unreachable')",
                "x = 5\ndef solution():\n    return x",
                "def solution():\n    return x",
                # exception classes are not builtins here: no traceback, no frames
                "def solution():\n    try:\n        1 / 0\n    except ZeroDivisionError as e:\n"
                "        return e.__traceback__.tb_frame.f_back.f_globals['__name__']"]
    try:
        first = harness.run(programs + PROBES)
    finally:
        harness.close()
    answers = [harness.answers[first + i] for i in range(len(programs) + len(PROBES))]
    assert answers[:len(programs)] == [("error:NameError", None), ("error:ImportError", None),
                                       ("ok", 3.0), ("ok", "unreachable"), ("ok", 5.0),
                                       ("error:NameError", None), ("error:NameError", None)]
    assert answers[len(programs):] == [(s, pytest.approx(v)) for s, v in PROBE_ANSWERS]
    assert harness.forked == [] and executor.TAMPERED_EXIT not in harness.exit_codes


def test_integrity_check_sees_replacements_with_a_lying_eq():
    intact = executor.integrity_check(executor.watched_modules(), (executor._MATH_PUBLIC,))

    class AlwaysEqual:
        def __eq__(self, other):
            return True
        __hash__ = object.__hash__

    assert intact()
    original = math.floor
    math.floor = AlwaysEqual()
    try:
        assert not intact()
    finally:
        math.floor = original
    assert intact()
    executor._MATH_PUBLIC["e"], saved = 3, executor._MATH_PUBLIC["e"]
    try:
        assert not intact()
    finally:
        executor._MATH_PUBLIC["e"] = saved
    assert intact()

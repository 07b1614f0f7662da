"""Hang watchdog: a rank that stays in one phase (generation, logprobs, scoring, update, eval,
save, ...) longer than `trainer.hang_timeout_s` prints one line naming its rank and the phase
and exits with code 3; the launcher (torchrun, srun --kill-on-bad-exit) then stops the other
ranks. The process-group timeout (parallel.timeout_minutes) bounds a collective waiting for a
dead peer; this bounds everything else (a stuck sandbox, a stuck filesystem, a deadlock).

Phases are entered through `phase(name)` (runtime.Timer uses it, so every timed phase is
watched). The first rank to exceed the timeout is the one that stopped making progress: the
others are still progressing or waiting in a later collective that started later.

Test hook: MEGATRON_REFT_TEST_HANG=<rank>:<phase> makes that rank block forever when it first
enters that phase.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time

from megatron_reft.reliability.errors import EXIT_FAULT

TEST_HANG_ENV = "MEGATRON_REFT_TEST_HANG"
# Start-up (building models, loading checkpoints, the sandbox) is not timed: its length scales
# with the model, and a peer that never arrives is caught by the process-group timeout.
STARTUP = "start-up"


class Watchdog:
    def __init__(self, timeout_s: float | None, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.phase, self.since = STARTUP, time.monotonic()
        self._hang = self._test_hang(rank)
        if timeout_s:
            threading.Thread(target=self._watch, name="megatron-reft-watchdog", daemon=True).start()

    @staticmethod
    def _test_hang(rank: int) -> str | None:
        spec = os.environ.get(TEST_HANG_ENV, "")
        hang_rank, _, hang_phase = spec.partition(":")
        return hang_phase if spec and hang_rank == str(rank) else None

    def enter(self, name: str) -> None:
        self.phase, self.since = name, time.monotonic()
        if self._hang == name:
            self._hang = None
            while True:  # the injected hang: no progress, no exit
                time.sleep(3600)

    def _watch(self) -> None:
        poll = max(0.2, min(5.0, self.timeout_s / 10))
        while True:
            time.sleep(poll)
            stuck_for = time.monotonic() - self.since
            if stuck_for > self.timeout_s and self.phase != STARTUP:
                self._fire(stuck_for)

    def _fire(self, stuck_for: float) -> None:
        print(f"hang: rank {self.rank} made no progress for {stuck_for:.0f} s in phase "
              f"'{self.phase}' (trainer.hang_timeout_s={self.timeout_s:g}); exiting",
              file=sys.stderr, flush=True)
        if os.environ.get("MEGATRON_REFT_DEBUG") == "1":
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(EXIT_FAULT)


_current: Watchdog | None = None


def start(timeout_s: float | None, rank: int) -> Watchdog:
    global _current
    _current = Watchdog(timeout_s, rank)
    return _current


def enter(name: str) -> None:
    if _current is not None:
        _current.enter(name)


@contextlib.contextmanager
def phase(name: str):
    """Mark a phase; on leaving it the rank is 'after <name>' (still watched)."""
    enter(name)
    try:
        yield
    finally:
        enter(f"after {name}")

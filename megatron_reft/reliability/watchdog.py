"""Hang watchdog: a rank that stays in one phase (generation, logprobs, scoring, update, eval,
save, ...) longer than `trainer.hang_timeout_s` prints one line naming its rank and the phase
and exits with code 3; the launcher (torchrun, srun --kill-on-bad-exit) then stops the other
ranks. The process-group timeout (parallel.timeout_minutes) bounds a collective waiting for a
dead peer; this bounds everything else (a stuck sandbox, a stuck filesystem, a deadlock).

Phases are entered through `phase(name)` (runtime.Timer uses it, so every timed phase is
watched). A rank blocked in a collective (torch.distributed, megatron's pipeline send/receive)
past the timeout is most likely waiting for the stuck rank, so it waits one more timeout: the
rank that stopped making progress outside any collective fires first and names itself; if every
rank is in a collective (a lost peer the backend does not time out) they fire at twice the
timeout, saying what they wait in.

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
# A separate critic's rank waiting for the actor's next request (issue 12): the actor's own
# phases are watched, and a dead actor fails the critic's receive.
IDLE = "idle"


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
            if stuck_for <= self.timeout_s or self.phase in (STARTUP, IDLE):
                continue
            waiting_in = _collective_in_progress()
            # A rank blocked in a collective is most likely waiting for the stuck one: it waits
            # one more timeout so that the stuck rank (which is not in a collective) fires first
            # and names itself.
            if waiting_in is None or stuck_for > 2 * self.timeout_s:
                self._fire(stuck_for, waiting_in)

    def _fire(self, stuck_for: float, waiting_in: str | None) -> None:
        waiting = f", waiting for other ranks in {waiting_in}" if waiting_in else ""
        print(f"hang: rank {self.rank} made no progress for {stuck_for:.0f} s in phase "
              f"'{self.phase}'{waiting} (trainer.hang_timeout_s={self.timeout_s:g}); exiting",
              file=sys.stderr, flush=True)
        if os.environ.get("MEGATRON_REFT_DEBUG") == "1":
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(EXIT_FAULT)


_COLLECTIVE_FILES = ("/torch/distributed/", "/megatron/core/pipeline_parallel/p2p_communication")


def _collective_in_progress() -> str | None:
    """The collective / point-to-point call the main thread is blocked in, if any (read from
    its innermost Python frames)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    for _ in range(6):
        if frame is None:
            return None
        if any(part in frame.f_code.co_filename for part in _COLLECTIVE_FILES):
            return frame.f_code.co_name
        frame = frame.f_back
    return None


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

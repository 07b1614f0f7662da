"""The zygote's fast lane: statically pure programs (purity.py) run back to back in one
long-lived executor child (executor.py) that entered the same jail as any forked child.

Every program still gets its own wall-clock limit, and the fast lane only ever *declines*:
a program that the executor finds impure, that runs longer than `budget_s` (50 ms by
default), that hits MemoryError (the heap may hold earlier programs' garbage), or whose
executor dies or misbehaves, is handed to the ordinary fork-per-program path and runs again
from scratch with its full timeout. Pure programs are deterministic, so a re-run gives the
answer the first run would have.

Requests are pipelined (up to DEPTH in the executor's pipe) so the executor never waits for
the zygote between programs; the program at the head of the line is the one running, and its
budget starts when the answer before it arrived.
"""
import collections
import json
import os
import select
import signal
import time

from . import jail as jail_mod
from .executor import executor_main

DEPTH = 8                  # programs written ahead to the executor
PIPE_BYTES = 60_000        # bytes in flight stay under the pipe's 64 KiB: writes never block
# Back-off, not switch-off: after DEATHS_BEFORE_PAUSE executors in a row died before serving
# anything (a jail that cannot be entered, or programs that kill it at once), the next
# PAUSE_PROGRAMS[0] programs fork; then the lane tries again, and each further death in a row
# doubles the pause, up to PAUSE_PROGRAMS[1]. One served answer resets it. A hostile program
# thus costs honest ones at most a pause of forks (~2 ms each), never the lane for good.
DEATHS_BEFORE_PAUSE = 3
PAUSE_PROGRAMS = (64, 4096)


class FastLane:
    def __init__(self, jail, poller, budget_s: float, max_programs: int,
                 reply, fork, verdict):
        self.jail, self.poller = jail, poller
        self.budget_s, self.max_programs = budget_s, max_programs
        self.reply, self.fork, self.verdict = reply, fork, verdict  # the zygote's callbacks
        self.enabled = budget_s > 0
        self.queue = collections.deque()      # waiting for the executor
        self.in_flight = collections.deque()  # (request, encoded size) written to it, in order
        self.pid = self.request_fd = self.reply_fd = None
        self.head_deadline = None
        self.inbuf = b""
        self.served = 0
        self.deaths_in_a_row = 0   # executors that died before serving anything
        self.paused_for = 0        # programs still to fork before the lane is tried again

    @property
    def deadline(self):
        return self.head_deadline if self.in_flight else None

    def submit(self, request):
        if self.enabled and len(request[1].encode()) < PIPE_BYTES // 2:
            self.queue.append(request)
        else:
            self.fork(request)

    def feed(self):
        """Write queued programs to the executor (starting one if needed)."""
        if not self.enabled:
            return
        while self.paused_for and self.queue:  # backing off: these fork
            self.paused_for -= 1
            self.fork(self.queue.popleft())
        while self.queue and len(self.in_flight) < DEPTH:
            request = self.queue[0]
            data = (json.dumps(request[1]) + "\n").encode()
            if sum(size for _, size in self.in_flight) + len(data) > PIPE_BYTES:
                return
            if self.pid is None:
                self._start()
            try:
                os.write(self.request_fd, data)
            except OSError:  # it died; the program waits for the next executor
                self._lost(died=True)
                return
            self.queue.popleft()
            if not self.in_flight:
                self.head_deadline = time.monotonic() + min(self.budget_s, request[2])
            self.in_flight.append((request, len(data)))

    def on_readable(self):
        try:
            chunk = os.read(self.reply_fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self._lost(died=True)
            return
        self.inbuf += chunk
        *lines, self.inbuf = self.inbuf.split(b"\n")
        if len(lines) > len(self.in_flight) or len(self.inbuf) > jail_mod.MAX_RESULT_BYTES:
            self._kill()  # more answers than questions, or an endless one: not our protocol
            return
        for line in lines:
            request, _ = self.in_flight.popleft()
            self.served += 1
            self.deaths_in_a_row = 0
            if line + b"\n" == jail_mod.FORK_AND_RETIRE:  # it saw tampering and exits (we
                self.fork(request)                       # make sure): that program runs
                self._requeue_in_flight()                # alone, the ones behind it never
                self._kill()                             # started
                return
            self._answer(request, line + b"\n")
            if self.in_flight:  # the next one starts now
                self.head_deadline = time.monotonic() + min(self.budget_s,
                                                            self.in_flight[0][0][2])
        if self.served >= self.max_programs and not self.in_flight:
            self._close_pipes()  # EOF on its stdin: the executor exits; SIGCHLD reaps it

    def _answer(self, request, line: bytes):
        if line == jail_mod.FORK_INSTEAD:
            self.fork(request)
            return
        status, value = self.verdict(None, 0, line)
        if status in ("killed", "error:BadResult"):
            self.fork(request)
        else:
            self.reply(request[0], status, value)

    def enforce(self, now: float):
        if self.in_flight and now >= self.head_deadline:
            self._kill()

    def on_exit(self, pid) -> bool:
        """SIGCHLD for `pid`: True if it was our executor (which then counts as lost)."""
        if self.pid is None or pid != self.pid:
            return False
        self._lost(died=True)
        return True

    # ---- executor lifecycle

    def _start(self):
        request_r, request_w = os.pipe2(os.O_CLOEXEC)
        reply_r, reply_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                executor_main(self.jail, request_r, reply_w)
            finally:
                os._exit(1)
        os.close(request_r)
        os.close(reply_w)
        os.set_blocking(request_w, False)
        os.set_blocking(reply_r, False)
        self.pid, self.request_fd, self.reply_fd = pid, request_w, reply_r
        self.served, self.inbuf = 0, b""
        self.poller.register(reply_r, select.POLLIN)

    def _kill(self):
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._lost()

    def _lost(self, died=False):
        """The executor is gone (killed by us, or `died` on its own). The program it was
        running goes to the fork path; those written behind it never started and go back to
        the front of the queue. Executors dying before serving anything pause the lane
        (DEATHS_BEFORE_PAUSE, PAUSE_PROGRAMS)."""
        if self.in_flight:
            self.fork(self.in_flight.popleft()[0])
            self._requeue_in_flight()
        if died and self.pid is not None and self.served == 0:
            self.deaths_in_a_row += 1
            if self.deaths_in_a_row >= DEATHS_BEFORE_PAUSE:
                doublings = self.deaths_in_a_row - DEATHS_BEFORE_PAUSE
                self.paused_for = min(PAUSE_PROGRAMS[0] << min(doublings, 16), PAUSE_PROGRAMS[1])
        self._close_pipes()

    def _requeue_in_flight(self):
        self.queue.extendleft(reversed([request for request, _ in self.in_flight]))
        self.in_flight.clear()

    def _close_pipes(self):
        if self.reply_fd is not None:
            self.poller.unregister(self.reply_fd)
            os.close(self.reply_fd)
            os.close(self.request_fd)
        self.pid = self.request_fd = self.reply_fd = None
        self.inbuf = b""

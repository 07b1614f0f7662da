"""Test hook: kill -9 a rank at a chosen point inside a checkpoint save (issue 11,
tests/test_fault_kill.py), the way the hang hook (watchdog.TEST_HANG_ENV) blocks one.

    MEGATRON_REFT_TEST_KILL_IN_SAVE=<rank>:<checkpoint name>:<point>

makes that rank SIGKILL itself when it reaches <point> of saving <checkpoint name> (e.g.
`1:step_3:shards`). Points, in the order a save passes them:

- `shards`:  this rank's weight/optimizer shards and RNG file are in `<name>.tmp/`, the other
             ranks may still be writing; nothing is renamed yet.
- `renamed`: (rank 0) the complete checkpoint has been renamed into place, `latest` has not
             moved yet.

SIGKILL, not an exception: nothing of ours runs after it (no cleanup, no atexit), exactly as
when an operator or the OOM killer ends the process. Unset, this costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

TEST_KILL_IN_SAVE_ENV = "MEGATRON_REFT_TEST_KILL_IN_SAVE"


def kill_point(point: str, checkpoint: str, rank: int) -> None:
    """SIGKILL this process if the test hook names this rank, checkpoint and point."""
    spec = os.environ.get(TEST_KILL_IN_SAVE_ENV)
    if spec and spec == f"{rank}:{checkpoint}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)

"""Fault tolerance of training jobs (docs/reliability.md): clean one-line failures, atomic and
fsync'd checkpoints, a non-finite guard, one job per run directory, resume checks, no orphaned
helper processes, and a hang watchdog."""
from megatron_reft.reliability.errors import (EXIT_FAULT, EXIT_USER, JobError, NonFiniteError,
                                              RunLockError, StorageError)

__all__ = ["EXIT_FAULT", "EXIT_USER", "JobError", "NonFiniteError", "RunLockError", "StorageError"]

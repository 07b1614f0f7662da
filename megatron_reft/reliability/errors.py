"""Failures a job reports in one line instead of a traceback.

Exit codes (docs/reliability.md): 2 for problems the user caused and can fix in the config or
the inputs (config, data, tokenizer, a run directory held by another job); 3 for faults of the
run itself that were handled cleanly (storage full or failing, non-finite training, a hang).
Anything else is a bug and keeps its traceback (exit 1).
"""
from __future__ import annotations

EXIT_USER = 2
EXIT_FAULT = 3


class JobError(RuntimeError):
    """A handled failure: `str(err)` is the one line printed; `exit_code` is the process's."""

    exit_code = EXIT_FAULT


class StorageError(JobError):
    """A checkpoint (or run-directory file) could not be written: path and errno in the text."""


class NonFiniteError(JobError):
    """Too many consecutive non-finite steps (trainer.max_nonfinite_steps), or non-finite
    weights about to be saved."""


class RunLockError(JobError):
    """trainer.output_dir is held by another running job."""

    exit_code = EXIT_USER

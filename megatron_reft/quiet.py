"""Known library warnings that say nothing actionable to a user of this package (a CPU run without
Apex/Transformer Engine, megatron's and torch's own deprecations inside dist_checkpointing), so
that a normal run prints our lines. `megatron-reft --verbose ...` (or MEGATRON_REFT_VERBOSE=1,
which torchrun/srun ranks inherit) shows everything."""
from __future__ import annotations

import os
import warnings

VERBOSE_ENV = "MEGATRON_REFT_VERBOSE"
# (message regex, category): matched at the start of the warning's text.
KNOWN_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Apex is not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),
    (r"When using async grad allreduce it is recommended to set the environment variable "
     r"CUDA_DEVICE_MAX_CONNECTIONS", UserWarning),
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def filter_known_warnings() -> None:
    if verbose():
        return
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)

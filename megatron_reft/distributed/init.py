"""Start torch.distributed and megatron's parallel state from torchrun or Slurm.

One function, `initialize(...)`, works the same under `torchrun`, `srun` and a plain
`python` (a world of one). NCCL on GPUs, gloo on CPU; on CPU the compatibility layer
(`cpu_compat`) is installed first so megatron-core's CUDA assumptions resolve to the CPU.
"""
from __future__ import annotations

import datetime
import os
import random
import re
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_reft.distributed import cpu_compat


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list like 'gpu[001-003,007],cpu1' without calling scontrol."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            hi = hi or lo
            for n in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    return hosts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launch_env(environ=None) -> LaunchEnv:
    """torchrun variables win; then Slurm's; otherwise a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                         "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = expand_slurm_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost")))
        # A port derived from the job id lets every rank agree without talking first;
        # MASTER_PORT (set by our sbatch scripts) overrides it.
        job_port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)),
                         env.get("MASTER_ADDR", nodes[0] if nodes else "127.0.0.1"),
                         int(env.get("MASTER_PORT", job_port)), "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_process_group(timeout_minutes: float = 10.0) -> LaunchEnv:
    """Join the job's torch.distributed world (torchrun, Slurm or a plain `python`): on GPUs
    NCCL for device tensors and gloo beside it for host tensors, on CPU gloo (after installing
    the CPU compatibility layer). Shared by `initialize` and the split actor/critic world
    (distributed/roles.py)."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.install()
    launch = detect_launch_env()
    if on_gpu:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(
            # On GPUs NCCL carries device tensors and gloo the host-side statistics (rewards,
            # loss sums, step metrics) that the trainers all-reduce; groups megatron-core
            # creates inherit both.
            backend="cpu:gloo,cuda:nccl" if on_gpu else "gloo",
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank, world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return launch


def seed_model_parallel(seed: int) -> None:
    from megatron.core import tensor_parallel as mtp

    seed_everything(seed)
    mtp.model_parallel_cuda_manual_seed(seed)


def initialize(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
               timeout_minutes: float = 10.0) -> LaunchEnv:
    """Initialise the process group and megatron parallel state (TP x PP x DP).

    `timeout_minutes` bounds how long a collective waits for a dead peer, so a job whose rank
    died ends instead of hanging (the Slurm scripts rely on this to fail fast).
    """
    from megatron.core import parallel_state

    launch = start_process_group(timeout_minutes)
    if launch.world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"world size {launch.world_size} is not divisible by "
                         f"TP x PP = {tensor_parallel} x {pipeline_parallel}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        distributed_timeout_minutes=int(max(1, timeout_minutes)),
    )
    seed_model_parallel(seed)
    return launch


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0

"""Helpers for the fault-injection tests: run the CLI as a user would, tag every process a run
starts (an environment variable children inherit) so leftovers can be counted, read
checkpoints without megatron."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch

from dist_utils import find_free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
TAG_VAR = "MEGATRON_REFT_FAULT_TEST_TAG"
FAST = ["trainer.progress_bar=false", "trainer.tensorboard=false"]


def env(tag: str | None = None, **extra) -> dict:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_NTASKS", "SLURM_JOB_ID", "MEGATRON_REFT_DEBUG"):
        out.pop(var, None)
    out[TAG_VAR] = tag or uuid.uuid4().hex
    out.update(extra)
    return out


def command(job: str, out: Path, *overrides: str, nproc: int = 1, config: Path = TINY) -> list[str]:
    cli = ["-m", "megatron_reft.cli", job, "--config", str(config), f"trainer.output_dir={out}",
           *FAST, *overrides]
    if nproc == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(find_free_port()), *cli]


def run(cmd: list[str], environ: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=environ or env(), capture_output=True, text=True, timeout=timeout)


def tagged_pids(tag: str) -> list[int]:
    """Live processes (zombies excluded) whose environment carries the tag."""
    pids, needle = [], f"{TAG_VAR}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and \
                    (entry / "stat").read_text().split(")")[-1].split()[0] != "Z":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def wait_for_no_processes(tag: str, within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        left = tagged_pids(tag)
        if not left:
            return []
        time.sleep(0.2)
    return tagged_pids(tag)


def kill_all(tag: str) -> None:
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "config error:", "hang:"))]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def latest(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (model + optimizer), read without megatron."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(checkpoint / "weights"))
    meta = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
             if isinstance(v, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}:\n"
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def sandbox_pids() -> list[int]:
    """Reward-sandbox workers started from this checkout (they run with an empty environment,
    so the tag does not reach them; their command line names the package root)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"megatron_reft.reward.sandbox.worker" in b" ".join(cmdline) and str(REPO).encode() in cmdline:
            pids.append(int(entry.name))
    return pids

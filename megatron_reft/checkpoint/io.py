"""Checkpoints: one directory per checkpoint, written atomically, loadable at any TP × PP.

Layout of a checkpoint directory:
    model.yaml          architecture (ModelConfig, true vocabulary size) — training needs no model flags
    tokenizer/          tokenizer files (when known)
    weights/            megatron `dist_checkpointing` (torch_dist): model (+ optimizer) sharded state
    trainer_state.json  step, epoch, data position, metrics (training checkpoints only)
    rng/rank_<r>.pt     every rank's RNG states (exact resume)

A checkpoint is written into `<name>.tmp`, fsync'd, and swapped into place by rank 0 after all
ranks finished (reliability/storage.py), then `latest` (a one-line file) is replaced atomically
and durably: a crash leaves either the old or the new checkpoint, never a half-written "latest".
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from megatron_reft.models.families import ModelConfig, as_dict

LATEST = "latest"


def _rank() -> int:
    """Rank within this process's role: a separate critic on ranks of its own (issue 12) saves
    and loads its checkpoints on its ranks only, with its first rank as the writer."""
    from megatron_reft.distributed.roles import role_rank

    return role_rank()


def _group():
    from megatron_reft.distributed.roles import role_group

    return role_group()  # None: the whole world (no split)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_group())


def write_model_yaml(directory: str | Path, model: ModelConfig) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / "model.yaml").write_text(yaml.safe_dump(as_dict(model), sort_keys=False))


def read_model_yaml(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "model.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a megatron-reft checkpoint (no model.yaml)")
    return ModelConfig(**yaml.safe_load(path.read_text()))


def unwrap(model_chunk):
    """The ReftGPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model_chunk, "module"):
        model_chunk = model_chunk.module
    return model_chunk


def model_sharded_state_dict(model_chunk) -> dict:
    return unwrap(model_chunk).sharded_state_dict(prefix="model.")


def checkpoint_tensor_keys(directory: str | Path) -> set[str]:
    from megatron.core import dist_checkpointing

    from megatron_reft.distributed.roles import role_as_world

    with role_as_world():
        return set(dist_checkpointing.load_tensors_metadata(str(Path(directory) / "weights")).keys())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        from megatron.core import tensor_parallel

        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(directory: str | Path, model_chunk, model: ModelConfig, *, optimizer=None,
                    trainer_state: dict | None = None, tokenizer=None,
                    update_latest: bool = True, carry_from: str | Path | None = None) -> Path:
    """Save model (+ optimizer, trainer state, RNG) to `directory`, atomically and durably.

    `carry_from`: the checkpoint training started from; its `hf/` side files are copied along.
    A storage failure on any rank (disk full, I/O error) raises StorageError on every rank with
    one line naming the path and errno; the unfinished `<name>.tmp` is removed and `latest` /
    an existing `<name>` are untouched (docs/reliability.md).
    """
    from megatron_reft.reliability import orphans, watchdog

    watchdog.enter("save")
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    orphans.keep_checkpoint_writer_in_process()
    refuse_non_finite_weights(model_chunk, final)
    _agree_or_raise(tmp, _on_rank0(lambda: _fresh_tmp(tmp)))
    _agree_or_raise(tmp, _attempt(lambda: _write_shards(tmp, model_chunk, optimizer)))
    _agree_or_raise(tmp, _on_rank0(lambda: _finish(tmp, final, model, tokenizer, carry_from,
                                                   trainer_state, update_latest)))
    watchdog.enter("after save")
    return final


def refuse_non_finite_weights(model_chunk, destination: Path) -> None:
    """Non-finite weights are never saved (they would become `latest`): NonFiniteError on every
    rank if any rank holds a NaN/Inf parameter."""
    from megatron_reft.reliability import NonFiniteError

    bad = torch.tensor([0.0])
    for param in unwrap(model_chunk).parameters():
        if not torch.isfinite(param.detach()).all():
            bad[0] = 1.0
            break
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=_group())
    if bad.item():
        latest = latest_checkpoint(destination.parent)
        raise NonFiniteError(f"refusing to save {destination.name}: the model holds non-finite weights "
                             f"(last good checkpoint: {latest if latest is not None else 'none'})")


def _attempt(fn) -> BaseException | None:
    try:
        fn()
        return None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # reported collectively by _agree_or_raise; torch's
        return err                # CheckpointException derives from BaseException


def _on_rank0(fn) -> BaseException | None:
    return _attempt(fn) if _rank() == 0 else None


def _fresh_tmp(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "weights").mkdir(parents=True)
    (tmp / "rng").mkdir()


# The distributed optimizer's default format in megatron-core 0.16 ("fully_sharded_model_space",
# deprecated) cannot be saved at all, and "fully_reshardable" cannot be loaded into torch's Adam
# (its per-parameter "step"). "dp_reshardable" (Megatron-LM's default) saves each rank's flat
# buckets in parallel; megatron reshards it in DP only, so a resume keeps TP and PP.
# Other optimizers ignore the setting.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _optimizer_state(optimizer, model_state: dict, is_loading: bool = False):
    if is_loading:
        _allocate_distributed_optimizer_state(optimizer)
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=dict(_OPTIMIZER_FORMAT))


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _restore_distributed_adam_steps(optimizer) -> None:
    """torch's Adam (no TE/apex) counts steps per parameter, in a tensor it increments in place.
    The distributed optimizer saves one common step and, on load, gives every parameter the
    *same* tensor (so one optimizer step would advance it once per parameter), then its
    per-parameter copy writes the pre-load value (the dummy step's 1) into it. Either way Adam's
    bias correction would be wrong: give every parameter its own count, the checkpoint's."""
    for distributed in _distributed_optimizers(optimizer):
        for group in distributed.optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = distributed.optimizer.state.get(param, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                 device=state["step"].device)


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """A distributed optimizer that has not stepped yet has no Adam state to load into (without
    TE/apex megatron reads the step count from it). Megatron's own dummy step allocates it; every
    value it writes is then overwritten by the checkpoint (optimizer state, main weights, and the
    model weights loaded after them)."""
    for distributed in _distributed_optimizers(optimizer):
        if not distributed.optimizer.state:
            distributed._init_optimizer_states_with_dummy_values()


def _write_shards(tmp: Path, model_chunk, optimizer) -> None:
    from megatron.core import dist_checkpointing

    from megatron_reft.reliability import faultpoints
    from megatron_reft.distributed.roles import role_as_world
    from megatron_reft.reliability.storage import fsync_file

    state = model_sharded_state_dict(model_chunk)
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(optimizer, state)
    with role_as_world():  # the writers: this role's ranks (all ranks when the world is not split)
        dist_checkpointing.save(state, str(tmp / "weights"))  # megatron fsyncs the shard files
    rng_file = tmp / "rng" / f"rank_{_rank():05d}.pt"
    torch.save(rng_state(), rng_file)
    fsync_file(rng_file)
    faultpoints.kill_point("shards", tmp.name[:-len(".tmp")], _rank())


def _finish(tmp: Path, final: Path, model: ModelConfig, tokenizer, carry_from, trainer_state,
            update_latest: bool) -> None:
    from megatron_reft.reliability import faultpoints
    from megatron_reft.reliability.storage import fsync_tree, replace_directory

    write_model_yaml(tmp, model)
    if tokenizer is not None:  # anything with save(dir): our Tokenizer, an HF tokenizer
        tokenizer.save(str(tmp / "tokenizer"))
    if carry_from is not None and (Path(carry_from) / "hf").is_dir():
        # The original HF config/extra rows travel with every descendant checkpoint, so
        # `convert megatron-to-hf` of a trained checkpoint needs no --source.
        shutil.copytree(Path(carry_from) / "hf", tmp / "hf")
    if trainer_state is not None:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    fsync_tree(tmp)  # complete on disk before anything points at it
    replace_directory(tmp, final)
    faultpoints.kill_point("renamed", final.name, _rank())
    if update_latest:
        mark_latest(final)


def _agree_or_raise(tmp: Path, error: BaseException | None) -> None:
    """Every rank learns whether any rank failed; all raise the same one-line StorageError."""
    from megatron_reft.reliability import StorageError
    from megatron_reft.reliability.storage import describe_failure

    line = None if error is None else describe_failure(error, tmp)
    lines = [line]
    if dist.is_initialized():
        lines = [None] * dist.get_world_size(_group())
        dist.all_gather_object(lines, line, group=_group())
    failed = [(r, text) for r, text in enumerate(lines) if text is not None]
    if not failed:
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # free the space the partial write took
    latest = latest_checkpoint(tmp.parent)
    rank, text = failed[0]
    if error is not None and "[Errno " not in line:
        raise error  # not a storage fault but a bug: keep its traceback (the others report it)
    kept = f"latest is still {latest.name}" if latest is not None else "no earlier checkpoint"
    raise StorageError(f"checkpoint save failed on rank {rank}: {text} ({kept})") from error


def mark_latest(checkpoint: Path) -> None:
    from megatron_reft.reliability.storage import write_text_durably

    write_text_durably(checkpoint.parent / LATEST, checkpoint.name + "\n")


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    pointer = Path(checkpoints_dir) / LATEST
    if not pointer.is_file():
        return None
    candidate = Path(checkpoints_dir) / pointer.read_text().strip()
    return candidate if (candidate / "model.yaml").is_file() else None


def load_checkpoint(directory: str | Path, model_chunk, *, optimizer=None,
                    load_rng: bool = False) -> dict[str, Any]:
    """Load weights (+ optimizer, RNG) into an already-built model at any TP × PP.

    A checkpoint without a value head (a converted HF model, an SFT checkpoint) leaves the
    model's freshly initialised head alone (reft.md §4: random value-head init).
    Returns the trainer state (empty for weight-only checkpoints).
    """
    from megatron.core import dist_checkpointing

    from megatron_reft.distributed.roles import role_as_world

    directory = Path(directory)
    present = checkpoint_tensor_keys(directory)
    state = model_sharded_state_dict(model_chunk)
    state = {k: v for k, v in state.items() if not _missing_value_head(k, v, present)}
    if optimizer is not None:
        state["optimizer"] = _optimizer_state(optimizer, state, is_loading=True)
    with role_as_world():
        loaded = dist_checkpointing.load(state, str(directory / "weights"))
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer copies into views of the weights
            optimizer.load_state_dict(loaded.pop("optimizer"))
        _restore_distributed_adam_steps(optimizer)
    model_state = {k[len("model."):]: v for k, v in loaded.items() if k.startswith("model.")}
    missing = unwrap(model_chunk).load_state_dict(model_state, strict=False).missing_keys
    unexpected_missing = [k for k in missing if not k.startswith("value_head") and "_extra_state" not in k]
    if unexpected_missing:
        raise RuntimeError(f"{directory}: checkpoint lacks {unexpected_missing[:5]}")
    if load_rng:
        rng_file = directory / "rng" / f"rank_{_rank():05d}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
    trainer_file = directory / "trainer_state.json"
    return json.loads(trainer_file.read_text()) if trainer_file.is_file() else {}


def _missing_value_head(key: str, value, present: set[str]) -> bool:
    return "value_head" in key and getattr(value, "key", key) not in present


def prune_checkpoints(checkpoints_dir: str | Path, keep_last: int, protect: tuple[str, ...] = ("best",)) -> None:
    """Delete old step checkpoints, keeping the newest `keep_last` and protected names."""
    if _rank() != 0:
        return
    root = Path(checkpoints_dir)
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()),  # not .tmp/.old
                   key=lambda p: int(p.name.split("_")[1]))
    latest = latest_checkpoint(root)
    for old in steps[:-keep_last] if keep_last > 0 else []:
        if old.name not in protect and old != latest:
            shutil.rmtree(old, ignore_errors=True)

"""What every job (sft, ppo, eval) does around its algorithm: read and validate the config,
start the distributed world, get the tokenizer and data, log metrics, pick the checkpoint to
resume from. Kept here so trainer files read as the algorithm."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_reft.config import (Config, ConfigError, ModelConfig, load_config, resolve_model_config,
                                  save_config, validate, world_size_from_env)
from megatron_reft.distributed import init as dist_init
from megatron_reft.reliability.storage import STORAGE_ERRNOS


def parse_job_args(argv, prog: str, description: str, extra=None):
    parser = argparse.ArgumentParser(prog=f"megatron-reft {prog}", description=description)
    parser.add_argument("--config", help="YAML recipe (see docs/configuration.md)")
    if extra:
        extra(parser)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.max_steps=10")
    return parser.parse_args(argv)


def load_and_validate(config_path, overrides, job: str, run_kind: str | None = None) -> Config:
    """Everything checkable without a process group, before one is made. `run_kind`: whose
    checkpoints an auto-resumed trainer.output_dir may hold (default: `job`)."""
    config = load_config(config_path, overrides)
    from megatron_reft import hub

    try:  # hub ids in model.load / data.tokenizer become local snapshot directories
        hub.resolve_config(config)
    except hub.HubError as err:
        raise ConfigError(str(err)) from None
    vocab_hint = 1 if config.data.train_file == "synthetic" else None  # real size known later
    try:
        model = resolve_model_config(config, vocab_size=vocab_hint)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    # No launcher variables means a plain `python` run: a world of one (distributed.init does the
    # same), so the batch-size rules still apply instead of failing later in the engine.
    world_size = world_size_from_env()
    validate(config, model, job=job, world_size=1 if world_size is None else world_size)
    kind = run_kind or job  # train-rm validates as sft, but its checkpoints are "rm" ones
    if kind in ("sft", "ppo", "rm"):
        check_run_dir_belongs_to(config, kind)
    return config


def check_run_dir_belongs_to(config: Config, job: str) -> None:
    """Auto-resume must not pick up another job's checkpoint: an SFT checkpoint has no value head
    or PPO optimizer state, and resuming from it used to die deep inside megatron (after the run's
    config.yaml had been overwritten). Checked before anything is written."""
    from megatron_reft.checkpoint.io import latest_checkpoint

    if config.trainer.resume != "auto":
        return
    checkpoints = Path(config.trainer.output_dir) / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    state_file = latest / "trainer_state.json" if latest is not None else None
    if state_file is None or not state_file.is_file():
        return
    written_by = json.loads(state_file.read_text()).get("job")
    if written_by is not None and written_by != job:
        raise ConfigError(f"trainer.output_dir: {checkpoints} holds {written_by} checkpoints ({latest.name}); "
                          f"give this {job} job its own trainer.output_dir (or trainer.resume=none)")


def exit_on_config_error(fn):
    """Config problems print one line per problem and exit 2, before any rank starts work;
    handled faults (reliability.JobError: storage, non-finite, run lock) and storage OSErrors
    print one line and exit with their code (docs/reliability.md). MEGATRON_REFT_DEBUG=1 adds
    the traceback."""
    from megatron_reft.reliability.errors import EXIT_FAULT, JobError

    def wrapper(argv=None):
        try:
            return fn(argv)
        except ConfigError as err:
            _report(f"config error:\n{err}")
            return 2
        except JobError as err:
            _report(f"error: {err}")
            return err.exit_code
        except OSError as err:  # e.g. disk full while writing metrics.jsonl or config.yaml
            if err.errno not in STORAGE_ERRNOS:
                raise  # anything else is a bug: keep the traceback
            from megatron_reft.reliability.storage import describe_failure

            _report(f"error: {describe_failure(err, err.filename or '.')}")
            return EXIT_FAULT
    return wrapper


def _report(message: str) -> None:
    """Once per job: errors past start-up are agreed by all ranks, so rank 0 speaks for them."""
    if os.environ.get("MEGATRON_REFT_DEBUG") == "1":
        import traceback

        traceback.print_exc()
    from megatron_reft.distributed.roles import role_rank

    if role_rank() == 0 or not dist.is_initialized():  # a separate critic's lead speaks for it
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- distributed
def start(config: Config, job: str | None = None) -> dist_init.LaunchEnv:
    """Start the world. A training `job` ("sft", "ppo") also takes trainer.output_dir (one job per
    run directory), cleans up what a killed predecessor left, and starts the hang watchdog."""
    from megatron_reft.reliability import orphans, watchdog

    from megatron_reft.distributed import roles

    p = config.parallel
    orphans.install_parent_death_signal_for_forks()
    split = roles.split_args_of(config) if job == "ppo" else None
    if split is None:
        launch = dist_init.initialize(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                      seed=config.trainer.seed, timeout_minutes=p.timeout_minutes)
    else:  # a separate critic on ranks of its own: actor ranks first, then the critic's (issue 12)
        roles.start_split_world(split, seed=config.trainer.seed, timeout_minutes=p.timeout_minutes)
        launch = dist_init.detect_launch_env()
    if launch.launcher == "torchrun":
        orphans.die_with_launcher()
    if config.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if job is not None:
        role = roles.current_role()
        if role is None or role.name == "actor":  # the actor's rank 0 holds the run directory
            claim_run_dir(config, job)
        watchdog.start(config.trainer.hang_timeout_s, rank())
    return launch


def claim_run_dir(config: Config, job: str) -> None:
    """Rank 0 locks the run directory and removes stale `*.tmp` / restores interrupted swaps;
    every rank learns the outcome (a refusal ends all ranks with the same line)."""
    from megatron_reft.reliability import RunLockError, runlock
    from megatron_reft.reliability.storage import recover_interrupted_swaps

    global _run_lock
    if _run_lock is not None:  # one job at a time per process: the previous one has ended
        _run_lock.release()
        _run_lock = None
    outcome = [None, []]
    if rank() == 0:
        try:
            _run_lock = runlock.acquire(config.trainer.output_dir, job)
            outcome[1] = recover_interrupted_swaps(Path(config.trainer.output_dir) / "checkpoints")
            outcome[1] += recover_interrupted_swaps(config.trainer.output_dir)
        except RunLockError as err:
            outcome[0] = str(err)
    if dist.is_initialized():
        from megatron_reft.distributed.roles import role_group

        dist.broadcast_object_list(outcome, src=0, group=role_group())  # role_group: actor ranks
    if outcome[0] is not None:
        raise RunLockError(outcome[0])
    for action in outcome[1]:
        print0(f"start-up: {action}")


_run_lock = None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def dp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def print0(*args) -> None:
    if rank() == 0:
        print(*args, flush=True)


def layout_line(config: Config) -> str:
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    device = f"{torch.cuda.device_count()} GPU(s)/node" if torch.cuda.is_available() else "CPU (gloo)"
    from megatron_reft.distributed.roles import current_split

    split = current_split()
    if split is not None:  # a separate critic on ranks of its own (issue 12)
        a, c = split.actor, split.critic
        return (f"layout: world={world} = actor ranks {a.first_rank}-{a.first_rank + a.size - 1} "
                f"(TP={a.tensor_parallel} PP={a.pipeline_parallel} DP={a.data_parallel}) + critic ranks "
                f"{c.first_rank}-{c.first_rank + c.size - 1} (TP={c.tensor_parallel} PP={c.pipeline_parallel} "
                f"DP={c.data_parallel}) on {device}")
    return f"layout: world={world} TP={tp} PP={pp} DP={world // (tp * pp)} on {device}"


# ---------------------------------------------------------------- data
@dataclass
class Data:
    tokenizer: object
    tokenizer_dir: str | None
    train: list = field(default_factory=list)
    eval: list = field(default_factory=list)


def _tokenizer_source(config: Config) -> str | None:
    if config.data.tokenizer:
        return config.data.tokenizer
    if config.model.load and (Path(config.model.load) / "tokenizer").is_dir():
        return str(Path(config.model.load) / "tokenizer")
    return None


def load_data(config: Config, need_train: bool = True) -> Data:
    """Tokenizer + records. The synthetic task's tokenizer is trained once by rank 0."""
    from megatron_reft.data import load_records, load_tokenizer, make_synthetic_splits, train_synthetic_tokenizer

    d = config.data
    source = _tokenizer_source(config)
    synthetic_train = synthetic_eval = None
    if "synthetic" in (d.train_file, d.eval_file):
        synthetic_train, synthetic_eval = make_synthetic_splits(
            d.synthetic_train_items, d.synthetic_eval_items, d.synthetic_seed, d.synthetic_difficulty, d.cot_type)
    if source is None and synthetic_train is not None:
        source = str(Path(config.trainer.output_dir) / "tokenizer")
        if rank() == 0 and not Path(source).is_dir():
            train_synthetic_tokenizer(synthetic_train, source + ".tmp", d.synthetic_vocab_size)
            os.replace(source + ".tmp", source)
        barrier()
    if source is None:
        raise ConfigError("data.tokenizer: no tokenizer (set data.tokenizer or use a model.load "
                          "checkpoint that has tokenizer/)")
    data = Data(_user_input("data.tokenizer", load_tokenizer, source), source)
    # Each split comes from its own source: a real train file with `eval_file: synthetic` (or the
    # reverse) mixes them; with the synthetic train split and no eval file, its held-out split.
    if need_train and d.train_file == "synthetic":
        data.train = synthetic_train
    elif need_train and d.train_file:
        data.train, report = _user_input("data.train_file", load_records, d.train_file, d.cot_type,
                                         d.format, d.on_malformed)
        print0(f"train data: {report}")
    if d.eval_file == "synthetic" or (d.train_file == "synthetic" and not d.eval_file):
        data.eval = synthetic_eval
    elif d.eval_file:
        data.eval, report = _user_input("data.eval_file", load_records, d.eval_file, d.cot_type,
                                        d.format, d.on_malformed, require_cot=False)
        print0(f"eval data: {report}")
    if d.max_eval_items is not None:
        data.eval = data.eval[:d.max_eval_items]
    return data


def _user_input(key: str, load, path, *args, **kwargs):
    """Load a user-named file; any failure becomes one line naming the key, the file and the
    problem (a broken tokenizer.json, non-UTF-8 bytes, malformed records), exit 2."""
    try:
        return load(path, *args, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # whatever a parser raises, it is the input's fault here
        text = " ".join(str(err).split()) or type(err).__name__
        if str(path) not in text:
            text = f"{path}: {text}"
        raise ConfigError(f"{key}: {text[:400]}") from err


def model_config_for(config: Config, data: Data) -> ModelConfig:
    model = resolve_model_config(config, vocab_size=data.tokenizer.vocab_size)
    if data.tokenizer.vocab_size > model.vocab_size:
        raise ConfigError(f"model.vocab_size: {model.vocab_size} is smaller than the tokenizer's "
                          f"{data.tokenizer.vocab_size}")
    return model


# ---------------------------------------------------------------- schedule
def learning_rate(step: int, total_steps: int, base_lr: float, schedule: str,
                  warmup_fraction: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over `warmup_fraction` of the planned steps, then linear decay to min_lr
    (reft.md §5: warm-up SFT 1e-5, 10% warm-up over a 40-epoch run); or constant (PPO)."""
    if schedule == "constant":
        return base_lr
    warmup = int(math.floor(warmup_fraction * total_steps))
    if step < warmup:
        return base_lr * (step + 1) / warmup
    remaining = max(total_steps - warmup, 1)
    progress = min((step - warmup) / remaining, 1.0)
    return min_lr + (base_lr - min_lr) * (1.0 - progress)


# ---------------------------------------------------------------- outputs
from megatron_reft.tracking import MetricsLogger  # noqa: E402,F401  (jobs use runtime.MetricsLogger)


class Timer:
    """Per-phase wall-clock timings for a step (synchronised on GPU)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        from megatron_reft.reliability import watchdog

        timer = self

        class _Phase:
            def __enter__(self):
                watchdog.enter(name)  # every timed phase is watched for hangs
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.t0
                watchdog.enter(f"after {name}")

        return _Phase()

    def as_metrics(self, prefix: str = "time_") -> dict:
        return {prefix + k: round(v, 4) for k, v in self.times.items()}


def out_of_time(started: float, max_seconds: float | None) -> bool:
    """Same answer on every rank (rank 0 decides), so no rank stops alone."""
    if max_seconds is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - started >= max_seconds)])
    if dist.is_initialized():
        from megatron_reft.distributed.roles import role_group

        dist.broadcast(flag, src=0, group=role_group())  # the actor's ranks in a split world
    return bool(flag.item())


def write_run_config(config: Config, model: ModelConfig | None = None, job: str | None = None) -> None:
    """Write config.yaml, after checking (given the model) that a resume is safe: the saved
    config and checkpoint are compared with this one first (reliability/resume.py)."""
    if model is not None:
        from megatron_reft.reliability.resume import check_resume

        checkpoint = resume_source(config)
        for line in check_resume(config, model, checkpoint, job) if checkpoint is not None else []:
            print0(line)
    if rank() == 0:
        save_config(config, Path(config.trainer.output_dir) / "config.yaml")


def resume_source(config: Config) -> Path | None:
    """`trainer.resume`: auto → latest checkpoint in output_dir/checkpoints; none; or a path."""
    from megatron_reft.checkpoint.io import latest_checkpoint

    choice = config.trainer.resume
    if choice == "none":
        return None
    if choice == "auto":
        return latest_checkpoint(Path(config.trainer.output_dir) / "checkpoints")
    if not (Path(choice) / "model.yaml").is_file():
        raise ConfigError(f"trainer.resume: not a checkpoint: {choice}")
    return Path(choice)

"""Unit tests of the fault-tolerance pieces (megatron_reft/reliability, docs/reliability.md):
atomic directory swap and its crash recovery, storage errors in one line, the run lock, resume
checks, data-file errors, the non-finite guard, and a poisoned gradient in a real megatron
engine. The end-to-end fault injection through the CLI is in test_fault_injection.py."""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from megatron_reft.config import ConfigError, load_config, save_config
from megatron_reft.models.families import ModelConfig, as_dict
from megatron_reft.reliability import NonFiniteError, RunLockError, runlock
from megatron_reft.reliability.numerics import NonFiniteGuard
from megatron_reft.reliability.resume import check_resume
from megatron_reft.reliability.storage import (append_whole_lines, describe_failure, recover_interrupted_swaps,
                                               replace_directory)

REPO = Path(__file__).resolve().parents[1]


def _checkpoint(path: Path, marker: str) -> Path:
    (path / "weights").mkdir(parents=True)
    for i in range(3):
        (path / "weights" / f"part{i}").write_text(marker)
    (path / "model.yaml").write_text(marker)
    return path


def _complete(path: Path, marker: str) -> bool:
    return all((path / "weights" / f"part{i}").read_text() == marker for i in range(3)) and \
        (path / "model.yaml").read_text() == marker


# ---------------------------------------------------------------- atomic swap
def test_swap_replaces_best_atomically(tmp_path):
    best, new = _checkpoint(tmp_path / "best", "old"), _checkpoint(tmp_path / "best.tmp", "new")
    replace_directory(new, best)
    assert _complete(best, "new") and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def _crash_between_renames(root: str) -> None:
    root = Path(root)
    replace_directory(root / "best.tmp", root / "best", _between=lambda: os._exit(9))


def test_crash_between_the_two_renames_leaves_a_complete_best(tmp_path):
    """The fallback path (no RENAME_EXCHANGE): a process killed between `best -> best.old` and
    `best.tmp -> best`; start-up recovery restores the complete old `best`."""
    _checkpoint(tmp_path / "best", "old")
    _checkpoint(tmp_path / "best.tmp", "new")
    child = mp.get_context("fork").Process(target=_crash_between_renames, args=(str(tmp_path),))
    child.start()
    child.join(30)
    assert child.exitcode == 9
    assert not (tmp_path / "best").exists() and _complete(tmp_path / "best.old", "old")  # mid-swap
    actions = recover_interrupted_swaps(tmp_path)
    assert _complete(tmp_path / "best", "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert actions == ["restored best from an interrupted swap", "removed stale best.tmp"]


def test_recovery_after_the_swap_finished_keeps_the_new_best(tmp_path):
    _checkpoint(tmp_path / "best", "new")
    _checkpoint(tmp_path / "best.old", "old")  # killed before the old copy was deleted
    (tmp_path / "latest.tmp").write_text("step_9\n")
    recover_interrupted_swaps(tmp_path)
    assert _complete(tmp_path / "best", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# ---------------------------------------------------------------- storage errors
def test_storage_error_names_path_and_errno():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/step_3.tmp/weights/__0_0.distcp")
        except OSError as inner:
            raise RuntimeError("unexpected pos 704 vs 598") from inner
    except RuntimeError as err:
        line = describe_failure(err, "/ckpt/step_3.tmp")
    assert line == "/ckpt/step_3.tmp/weights/__0_0.distcp: [Errno 28 ENOSPC] No space left on device"


def test_storage_error_without_an_oserror_probes_the_disk(tmp_path):
    line = describe_failure(RuntimeError("unexpected pos 704 vs 598"), tmp_path)
    assert line == f"{tmp_path}: RuntimeError: unexpected pos 704 vs 598"  # the disk is fine here
    os.chmod(tmp_path, 0o500)
    try:
        if os.geteuid() != 0:  # root writes anyway
            assert "EACCES" in describe_failure(RuntimeError("x"), tmp_path)
    finally:
        os.chmod(tmp_path, 0o700)


# ---------------------------------------------------------------- run lock
def _hold_lock(directory: str, ready) -> None:
    runlock.acquire(directory, "ppo")
    ready.set()
    time.sleep(600)


def test_a_line_that_does_not_fit_is_not_appended_at_all(tmp_path):
    """A write cut short (here by RLIMIT_FSIZE, as by a full disk) leaves the file as it was."""
    import resource

    path = tmp_path / "metrics.jsonl"
    append_whole_lines(path, '{"step": 1}\n')
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 10, limits[1]))
    try:
        with pytest.raises(OSError) as err:  # 10 bytes fit: a torn line without the cut-back
            append_whole_lines(path, json.dumps({"step": 2, "loss": 1.25}) + "\n")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert err.value.errno == errno.EFBIG and err.value.filename == str(path)
    assert path.read_text() == '{"step": 1}\n'


def test_resume_drops_lines_after_the_checkpoint_and_a_torn_line(tmp_path):
    from megatron_reft.tracking import _truncate_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    _truncate_after(path, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    inode = path.stat().st_ino
    _truncate_after(path, 3)  # nothing to drop: not rewritten (a full disk at start-up costs nothing)
    assert path.stat().st_ino == inode
    _truncate_after(path, 1)
    assert path.read_text() == '{"step": 1}\n' and not list(tmp_path.glob("*.tmp"))


def test_run_lock_refuses_a_second_job_and_takes_over_from_a_dead_one(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunLockError) as refused:
            runlock.acquire(tmp_path, "sft")
        message = str(refused.value)
        assert f"in use by ppo job PID {holder.pid} on {os.uname().nodename}" in message
        assert str(tmp_path / "job.lock") in message and "\n" not in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    lock = runlock.acquire(tmp_path, "sft")  # the file is still there; its holder is dead
    assert json.loads((tmp_path / "job.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "job.lock").exists()


def test_stale_rules_without_kernel_locks():
    me = {"host": "node1", "pid": os.getpid(), "slurm_job_id": "77"}
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert runlock.holder_is_stale({"host": "node1", "pid": dead.pid}, me)
    assert not runlock.holder_is_stale({"host": "node1", "pid": os.getppid()}, me)
    assert not runlock.holder_is_stale({"host": "node2", "pid": dead.pid}, me)  # cannot tell: refuse
    assert runlock.holder_is_stale({"host": "node2", "pid": 1, "slurm_job_id": "77"}, me)  # requeued
    assert runlock.holder_is_stale({}, me)


def test_failed_job_leaves_no_directory_it_created(tmp_path):
    lock = runlock.acquire(tmp_path / "new_run", "sft")
    assert (tmp_path / "new_run" / "job.lock").is_file()
    lock.release()
    assert not (tmp_path / "new_run").exists()


# ---------------------------------------------------------------- resume checks
def _run_dir(tmp_path: Path, overrides=()) -> tuple:
    config = load_config(REPO / "configs" / "tiny_cpu.yaml", [f"trainer.output_dir={tmp_path}"])
    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=128, vocab_size=300)
    ckpt = tmp_path / "checkpoints" / "step_2"
    ckpt.mkdir(parents=True)
    (ckpt / "model.yaml").write_text(yaml.safe_dump(as_dict(model)))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "sampler": {"global_batch_size": 16}}))
    save_config(config, tmp_path / "config.yaml")
    return load_config(REPO / "configs" / "tiny_cpu.yaml", [f"trainer.output_dir={tmp_path}", *overrides]), model, ckpt


@pytest.mark.parametrize("overrides, refused", [
    (["trainer.global_batch_size=32"], "trainer.global_batch_size: 32 differs from 16"),
    (["trainer.seed=7"], "trainer.seed: cannot change"),
    (["data.cot_type=pcot", "data.synthetic_seed=3"], "data.cot_type, data.synthetic_seed: cannot change"),
])
def test_unresumable_config_changes_are_refused(tmp_path, overrides, refused):
    config, model, ckpt = _run_dir(tmp_path, overrides)
    with pytest.raises(ConfigError) as err:
        check_resume(config, model, ckpt, "sft")
    assert str(err.value).startswith(refused) and "\n" not in str(err.value)


def test_unresumable_model_changes_name_every_key(tmp_path):
    config, model, ckpt = _run_dir(tmp_path)
    changed = ModelConfig(**{**as_dict(model), "vocab_size": 512, "family": "opt", "init_std": 0.1})
    with pytest.raises(ConfigError) as err:
        check_resume(config, changed, ckpt, "sft")
    message = str(err.value)
    assert message.startswith("model.activation, model.family, model.ffn_hidden_size") or \
        message.startswith("model.family")
    assert "model.vocab_size 300 -> 512" in message and "init_std" not in message


def test_resumable_changes_are_listed(tmp_path):
    config, model, ckpt = _run_dir(tmp_path, ["parallel.tensor_model_parallel_size=2",
                                              "trainer.max_steps=9", "trainer.save_interval=3"])
    lines = check_resume(config, model, ckpt, "sft")
    assert lines == ["resume: changed since the run started: parallel.tensor_model_parallel_size 1 -> 2, "
                     "trainer.max_steps None -> 9, trainer.save_interval None -> 3"]
    # PPO's sampler counts rollout batches: ppo.rollout_batch_size is the one that may not change
    config, model, ckpt = _run_dir(tmp_path / "ppo", ["ppo.rollout_batch_size=16"])
    (ckpt / "trainer_state.json").write_text(json.dumps({"sampler": {"global_batch_size": 8}}))
    with pytest.raises(ConfigError, match=r"^ppo.rollout_batch_size: 16 differs from 8 in "):
        check_resume(config, model, ckpt, "ppo")


# ---------------------------------------------------------------- data files
def test_non_utf8_data_names_file_and_line(tmp_path):
    from megatron_reft.data import load_records
    from megatron_reft.runtime import _user_input

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "1", "question": "1+1", "answer": "2"}\n{"id": "2", "question": "caf\xe9"}\n')
    with pytest.raises(ConfigError) as err:
        _user_input("data.train_file", load_records, str(path))
    assert str(err.value) == (f"data.train_file: {path}: not UTF-8 text (byte 0xe9 at offset 74, line 2); "
                              "convert the file to UTF-8")


def test_json_document_that_is_not_a_list_is_named(tmp_path):
    from megatron_reft.data import load_records

    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [{"question": "1+1", "answer": "2"}]}, indent=1))
    with pytest.raises(ValueError, match=r"wrapped.json: a single JSON object with keys \['data'\], expected a JSON list"):
        load_records(str(path))


# ---------------------------------------------------------------- non-finite guard
def test_guard_counts_and_stops_after_consecutive_nonfinite_steps(tmp_path):
    guard = NonFiniteGuard(3, tmp_path)
    seen = [guard.observe(ok) for ok in (True, False, False, True, False, False)]
    assert [m["skipped_step"] for m in seen] == [0, 1, 1, 0, 1, 1]
    assert seen[-1]["nonfinite_steps"] == 4
    guard.stop_if_exhausted(6)  # two in a row: goes on
    guard.observe(False)
    with pytest.raises(NonFiniteError, match=r"^step 7: 3 consecutive non-finite steps .* last good checkpoint: none$"):
        guard.stop_if_exhausted(7)
    assert NonFiniteGuard(0, tmp_path).stop_if_exhausted(1) is None  # 0: never stops


def _poisoned_gradient_worker(rank, world):
    from megatron_reft.distributed import init as dist_init
    from megatron_reft.engine import Engine, OptimSettings
    from megatron_reft.sft.trainer import sft_loss
    from megatron_reft.checkpoint.io import save_checkpoint

    torch.set_num_threads(1)
    dist_init.initialize(1, 1, seed=1)
    model = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                        max_position_embeddings=32)
    engine = Engine(model, optim=OptimSettings(lr=1e-2))
    engine.init_from_scratch(1)
    tokens = torch.randint(0, 64, (2, 12))
    mb = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(2, 12)}
    poisoned = next(p for n, p in engine.gpt.named_parameters() if "linear_fc1" in n)
    handle = poisoned.register_hook(lambda g: torch.full_like(g, float("nan")) if poison[0] else g)
    poison = [True]
    before = engine.parameters_fingerprint()
    skipped = engine.train_step([mb], sft_loss)
    after_skip = engine.parameters_fingerprint()
    poison[0] = False
    taken = engine.train_step([mb], sft_loss)
    after_step = engine.parameters_fingerprint()
    handle.remove()
    with torch.no_grad():  # non-finite weights are never saved
        poisoned.view(-1)[0] = float("inf")
    try:
        save_checkpoint(Path(os.environ["POISON_OUT"]) / "step_1", engine.module, model, optimizer=engine.optimizer)
        refused = None
    except NonFiniteError as err:
        refused = str(err)
    dist_init.shutdown()
    return skipped["update_ok"], skipped["grad_norm"], before == after_skip, taken["update_ok"], \
        after_step != after_skip, refused


def test_poisoned_gradient_skips_the_step_and_nonfinite_weights_are_not_saved(tmp_path, monkeypatch):
    from dist_utils import run_distributed

    monkeypatch.setenv("POISON_OUT", str(tmp_path))
    skipped_ok, skipped_norm, unchanged, taken_ok, changed, refused = run_distributed(
        _poisoned_gradient_worker, 1, init_process_group=False, timeout_s=300)[0]
    assert skipped_ok is False and skipped_norm != skipped_norm  # NaN
    assert unchanged  # the NaN never reached the weights
    assert taken_ok is True and changed  # the next, clean step trains
    assert refused.startswith("refusing to save step_1: the model holds non-finite weights")
    assert not (tmp_path / "step_1").exists() and not (tmp_path / "step_1.tmp").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_finds_one_bad_entry_anywhere(dtype):
    """reliability/numerics._tensors_finite reads only each tensor's min and max: one NaN, +inf
    or -inf anywhere (SIMD lanes, the tail past the last full vector, a 0-d tensor) must still
    be seen, and finite tensors (huge values included) must pass."""
    from megatron_reft.reliability.numerics import _tensors_finite

    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 64, 65, 4099):
        for pos in sorted({0, n // 2, n - 1}):
            for bad in (float("nan"), float("inf"), -float("inf")):
                poisoned = torch.randn(n, generator=g).to(dtype)
                poisoned[pos] = bad
                assert not _tensors_finite([torch.ones(3, dtype=dtype), poisoned]), (n, pos, bad)
    assert not _tensors_finite([torch.tensor(float("nan"))])
    huge = torch.full((9,), torch.finfo(dtype).max, dtype=dtype)
    assert _tensors_finite([huge, -huge, torch.randn(4099, generator=g).to(dtype), torch.tensor(1.0), torch.empty(0)])
    assert _tensors_finite([])

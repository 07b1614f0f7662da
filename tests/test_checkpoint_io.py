"""Checkpoint directories: atomic writes, the `latest` pointer, exact round trips.

A crash while a checkpoint is being written (simulated by a tokenizer whose save() raises after
the weights are on disk) must leave `<name>.tmp` behind, no `<name>`, and `latest` pointing at the
previous complete checkpoint. Loading restores weights, optimizer state and RNG exactly: one more
step from the loaded state equals the step the original run took.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from megatron_reft.checkpoint.io import LATEST, latest_checkpoint, mark_latest, prune_checkpoints



@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_child():
    """Spawned ranks inherit this; they also call torch.set_num_threads(1) themselves."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


# ---------------------------------------------------------------- pointer logic (no megatron)
def _fake_checkpoint(path: Path) -> Path:
    (path / "weights").mkdir(parents=True)
    (path / "model.yaml").write_text("family: llama\n")
    return path


def test_no_pointer_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "absent") is None


def test_tmp_dir_left_by_a_crash_is_ignored(tmp_path):
    good = _fake_checkpoint(tmp_path / "step_4")
    mark_latest(good)
    crashed = tmp_path / "step_8.tmp"
    (crashed / "weights").mkdir(parents=True)
    (crashed / "model.yaml").write_text("family: llama\n")  # even a nearly complete one
    assert latest_checkpoint(tmp_path) == good
    assert (tmp_path / LATEST).read_text() == "step_4\n"
    assert not (tmp_path / "latest.tmp").exists()


def test_pointer_to_incomplete_directory_is_not_trusted(tmp_path):
    (tmp_path / "step_2" / "weights").mkdir(parents=True)  # no model.yaml
    (tmp_path / LATEST).write_text("step_2\n")
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / LATEST).write_text("step_3\n")  # names a directory that does not exist
    assert latest_checkpoint(tmp_path) is None


def test_prune_keeps_newest_latest_and_protected(tmp_path):
    for step in (1, 2, 3, 10, 20):
        _fake_checkpoint(tmp_path / f"step_{step}")
    _fake_checkpoint(tmp_path / "best")
    (tmp_path / "step_30.tmp").mkdir()
    mark_latest(tmp_path / "step_2")  # e.g. resumed from an older one
    prune_checkpoints(tmp_path, keep_last=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    # numeric (not lexical) order: step_10 and step_20 are the newest two
    assert left == ["best", LATEST, "step_10", "step_2", "step_20", "step_30.tmp"]


# ---------------------------------------------------------------- real saves (megatron, one process)
class _CrashingTokenizer:
    def save(self, path):
        raise RuntimeError("simulated crash while writing the checkpoint")


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (4, 9), generator=g)
    return [dict(tokens=tokens[i:i + 2, :-1], labels=tokens[i:i + 2, 1:],
                 loss_mask=torch.ones(2, 8, dtype=torch.long)) for i in (0, 2)]


def _snapshot(engine):
    return {k: v.detach().clone() for k, v in engine.gpt.state_dict().items() if "_extra_state" not in k}


def _equal(a: dict, b: dict, skip=()) -> list[str]:
    return [k for k in a if not any(s in k for s in skip) and not torch.equal(a[k], b[k])]


def _checkpoint_worker(rank, world_size, root):
    torch.set_num_threads(1)
    from megatron_reft.checkpoint.io import load_checkpoint, read_model_yaml, save_checkpoint
    from megatron_reft.distributed import init as dist_init
    from megatron_reft.engine import Engine, OptimSettings
    from megatron_reft.models.families import model_config_from_preset
    from megatron_reft.sft.trainer import sft_loss

    dist_init.initialize(1, 1, seed=3)
    root = Path(root)
    mc = model_config_from_preset("tiny-llama", vocab_size=300)

    def engine(seed, head=True):
        e = Engine(mc, with_value_head=head, optim=OptimSettings(lr=1e-3))
        e.init_from_scratch(seed)
        return e

    a = engine(5)
    a.train_step(_batch(), sft_loss)
    step1 = _snapshot(a)
    save_checkpoint(root / "step_1", a.module, mc, optimizer=a.optimizer, trainer_state={"step": 1})
    assert latest_checkpoint(root) == root / "step_1"
    assert not (root / "step_1.tmp").exists()
    assert read_model_yaml(root / "step_1") == mc
    drawn_after_save = torch.rand(5)

    # the original run's next step
    second = a.train_step(_batch(), sft_loss)
    step2 = _snapshot(a)

    # a crash while writing step_2: weights already written, directory never renamed
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(root / "step_2", a.module, mc, optimizer=a.optimizer,
                        trainer_state={"step": 2}, tokenizer=_CrashingTokenizer())
    assert not (root / "step_2.tmp").exists()  # a failed save removes its partial write (a killed
    # one leaves it for the next start-up's clean-up, reliability/storage.py)
    assert not (root / "step_2").exists()
    assert latest_checkpoint(root) == root / "step_1"
    assert (root / LATEST).read_text() == "step_1\n"

    # resume from latest: weights, optimizer state and RNG come back exactly
    b = engine(99)
    assert _equal(step1, _snapshot(b))  # different before loading
    state = load_checkpoint(latest_checkpoint(root), b.module, optimizer=b.optimizer, load_rng=True)
    assert state == {"step": 1}
    assert not _equal(step1, _snapshot(b))
    assert torch.equal(torch.rand(5), drawn_after_save)
    again = b.train_step(_batch(), sft_loss)
    assert again["grad_norm"] == second["grad_norm"]
    assert not _equal(step2, _snapshot(b)), "one step after loading differs from the original run"

    # a retry replaces the stale .tmp and only then moves `latest`
    save_checkpoint(root / "step_2", b.module, mc, optimizer=b.optimizer, trainer_state={"step": 2})
    assert latest_checkpoint(root) == root / "step_2" and not (root / "step_2.tmp").exists()

    # a weights-only checkpoint without a value head (SFT / converted model) keeps the fresh head
    plain = engine(11, head=False)
    save_checkpoint(root / "export", plain.module, mc, update_latest=False)
    assert latest_checkpoint(root) == root / "step_2"  # update_latest=False leaves the pointer
    assert not (root / "export" / "trainer_state.json").exists()
    c = Engine(mc, with_value_head=True)
    c.init_from_scratch(12)
    head = {k: v.clone() for k, v in c.gpt.value_head.state_dict().items()}
    assert load_checkpoint(root / "export", c.module) == {}
    assert not _equal(_snapshot(plain), _snapshot(c), skip=("value_head",))
    assert all(torch.equal(v, c.gpt.value_head.state_dict()[k]) for k, v in head.items())
    dist_init.shutdown()
    return True


def test_atomic_save_crash_resume_exact(tmp_path):
    assert run_distributed(_checkpoint_worker, 1, str(tmp_path / "checkpoints"),
                           init_process_group=False, timeout_s=180) == [True]

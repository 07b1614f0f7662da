"""Experiment tracking: grouped TensorBoard tags, trainer.log_interval, system figures, rollout
samples, and a real Weights & Biases run (WANDB_MODE=offline) that a resumed job continues."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_reft.config import load_config
from megatron_reft.tracking import MetricsLogger, samples_markdown, tag_for

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("train/", "rollout/", "timing/", "eval/", "system/")


def _scalar_tags(tb_dir: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_tags_are_grouped():
    assert [tag_for(k) for k in ("loss", "time_generation", "step_time", "eval_accuracy", "reward_mean",
                                 "kl", "peak_memory_gib", "tokens_per_s", "grad_norm")] == [
        "train/loss", "timing/generation", "timing/step", "eval/accuracy", "rollout/reward_mean",
        "rollout/kl", "system/peak_memory_gib", "system/tokens_per_s", "train/grad_norm"]


def test_log_interval_keeps_eval_and_last_steps_and_adds_system_metrics(tmp_path):
    config = load_config(None, [f"trainer.output_dir={tmp_path}", "trainer.log_interval=2",
                                "trainer.progress_bar=false"])
    logger = MetricsLogger(config, total_steps=5, start_step=0, desc="sft", train_flops_per_token=600.0)
    for step in range(1, 6):
        metrics = {"step": step, "loss": 1.0 / step, "tokens_per_s": 100.0, "time_train": 0.5}
        if step == 3:
            metrics["eval_loss"] = 0.7
        logger.log(metrics)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 5]  # every 2nd, the eval step, the last
    assert rows[0]["tokens_per_s_per_device"] == 100.0 and rows[0]["peak_memory_gib"] > 0.01  # RSS on CPU
    assert "mfu" not in rows[0]  # no known peak FLOP/s on a CPU
    tags, _ = _scalar_tags(tmp_path / "tensorboard")
    assert tags["train/loss"] == [2, 3, 4, 5] and tags["eval/loss"] == [3]
    assert {"timing/train", "system/peak_memory_gib", "system/tokens_per_s_per_device"} <= set(tags)
    assert not [t for t in tags if not t.startswith(GROUPS)]


def test_samples_markdown_escapes_cells():
    text = samples_markdown([{"prompt": "a|b", "response": "x\ny", "reward": 1.0}])
    assert text.splitlines() == ["| prompt | response | reward |", "|---|---|---|", "| a\\|b | x<br>y | 1.0 |"]


# ---------------------------------------------------------------- end to end (W&B offline)
def _wandb_records(run_file: Path):
    """Records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB-style 32 KiB
    blocks of chunks (crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) holding protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, pending = run_file.read_bytes(), 7, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pending += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _history_keys(run_file: Path) -> set[str]:
    keys = set()
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


def _job(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megatron_reft.cli", *args, "trainer.progress_bar=false"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    pytest.importorskip("wandb")
    work = tmp_path_factory.mktemp("tracking")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="offline",
               WANDB_SILENT="true")
    common = ["--config", str(REPO / "configs/tiny_cpu.yaml"), "data.synthetic_eval_items=8"]
    _job(work, env, "sft", *common, "trainer.max_steps=2", "trainer.output_dir=sft")
    ppo = [*common, "model.load=sft/checkpoints/step_2", "trainer.output_dir=ppo", "trainer.wandb_project=reft-test",
           "trainer.sample_interval=1", "trainer.num_samples=2", "trainer.eval_interval=2"]
    _job(work, env, "ppo", *ppo, "trainer.max_steps=1")
    first_id = (work / "ppo/wandb_run_id").read_text().strip()
    _job(work, env, "ppo", *ppo, "trainer.max_steps=2")  # resumes from step_1
    return work / "ppo", first_id


def test_wandb_offline_run_has_our_metrics_samples_and_plots(ppo_run):
    out, _ = ppo_run
    run_files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    keys = _history_keys(run_files[0]) | _history_keys(run_files[1])
    assert {"rollout/reward_mean", "train/policy_loss", "timing/generation", "system/peak_memory_gib",
            "eval/accuracy"} <= keys
    assert any(k.startswith("rollout/samples") for k in keys)  # the W&B table
    assert any(k.startswith("plots/ppo") for k in keys)  # the report's curves, logged at the end
    run = next(r.run for r in _wandb_records(run_files[0]) if r.WhichOneof("record_type") == "run")
    assert run.project == "reft-test" and "trainer" in {item.key for item in run.config.update}


def test_resumed_job_continues_the_same_wandb_run(ppo_run):
    out, first_id = ppo_run
    ids = {p.name.rsplit("-", 1)[1] for p in out.glob("wandb/offline-run-*")}
    assert ids == {first_id}


def test_rollout_samples_in_jsonl_and_tensorboard(ppo_run):
    out, _ = ppo_run
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 2, 2]
    for row in rows:
        assert {"prompt", "response", "reward", "extracted", "gold", "status"} <= set(row)
        assert row["prompt"] and isinstance(row["reward"], float)
    tags, acc = _scalar_tags(out / "tensorboard")
    assert {g for g in GROUPS if any(t.startswith(g) for t in tags)} == set(GROUPS)
    assert "rollout/samples/text_summary" in acc.Tags()["tensors"]

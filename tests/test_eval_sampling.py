"""`megatron-reft eval --samples K`: k samples per question, sharded over data-parallel ranks,
stored per question, resumable after an interruption (docs/evaluation.md).

Runs (real subprocesses on configs/tiny_cpu.yaml): a 1-step SFT gives a checkpoint; then
- DP=2 under torchrun: every eval item sampled exactly once, split over both ranks' files, and
  the JSON line's maj_at_k / pass_at_k equal voting.py recomputed from the stored samples;
- a single-process run killed (SIGKILL) once some questions are on disk, then the same command
  again: nothing stored before the kill is sampled again, nothing is lost, no id twice;
- changing K against an existing store: exit 2, one line, nothing written.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import find_free_port
from megatron_reft.evaluation.voting import sample_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
K = 3
COMMON = ["trainer.progress_bar=false", "trainer.tensorboard=false"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return env


def _eval_command(ckpt: Path, out: Path, items: int, nproc: int = 1, samples: int = K) -> list[str]:
    job = ["-m", "megatron_reft.cli", "eval", "--config", str(TINY), "--ckpt", str(ckpt), "--out", str(out),
           "--samples", str(samples), f"trainer.output_dir={out.parent}", f"data.max_eval_items={items}",
           "ppo.generation_micro_batch=3", *COMMON]  # one question (3 sequences) per batch
    if nproc == 1:
        return [sys.executable, *job]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(find_free_port()), *job]


def _run(command: list[str], cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, f"{' '.join(command)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _json_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _lines(store: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(store.glob("rank*.jsonl")) for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_sampling")
    _run([sys.executable, "-m", "megatron_reft.cli", "sft", "--config", str(TINY), f"trainer.output_dir={root / 'sft'}",
          "trainer.max_steps=1", *COMMON], root)
    return root / "sft" / "checkpoints" / "step_1"


def test_dp2_shards_every_item_once_and_metrics_match_the_store(checkpoint, tmp_path):
    out = tmp_path / "dp2" / "predictions.jsonl"
    line = _json_line(_run(_eval_command(checkpoint, out, items=6, nproc=2), tmp_path).stdout)
    store = out.with_suffix(".samples")
    per_rank = {f.name: [json.loads(x)["id"] for x in f.read_text().splitlines()] for f in store.glob("rank*.jsonl")}
    assert sorted(per_rank) == ["rank0.jsonl", "rank1.jsonl"] and all(len(v) == 3 for v in per_rank.values())
    lines = _lines(store)
    greedy_ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(item["id"] for item in lines) == sorted(greedy_ids) and len(set(greedy_ids)) == 6
    assert all(len(item["samples"]) == K for item in lines)
    expected = sample_metrics([item["samples"] for item in lines], K)
    assert line["maj_at_k"] == pytest.approx(expected["maj_at_k"])
    assert line["pass_at_k"] == pytest.approx(expected["pass_at_k"])
    assert (line["k"], line["sampled_items"], line["sampled_now"]) == (K, 6, 6)
    assert "accuracy" in line and "rerank_at_k" not in line


def test_interrupted_evaluation_resumes_without_duplicates_or_losses(checkpoint, tmp_path):
    out = tmp_path / "killed" / "predictions.jsonl"
    store = out.with_suffix(".samples")
    items = 32
    proc = subprocess.Popen(_eval_command(checkpoint, out, items), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (store / "rank0.jsonl").exists() and len(_lines(store)) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the evaluation finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = (store / "rank0.jsonl").read_text()
    kept = []
    for x in before.splitlines():  # a line the kill cut short is not JSON (and is sampled again)
        try:
            kept.append(json.loads(x))
        except json.JSONDecodeError:
            pass
    assert 2 <= len(kept) < items
    with (store / "rank0.jsonl").open("a") as f:  # as if killed in the middle of a write
        f.write(before.splitlines()[0][:40])
    line = _json_line(_run(_eval_command(checkpoint, out, items), tmp_path).stdout)
    after = _lines(store)
    ids = [item["id"] for item in after]
    assert len(ids) == len(set(ids)) == items  # nothing lost, nothing twice
    assert after[:len(kept)] == kept  # samples stored before the kill were not redrawn
    assert line["sampled_now"] == items - len(kept) and line["sampled_items"] == items
    assert line["pass_at_k"] == pytest.approx(sample_metrics([i["samples"] for i in after], K)["pass_at_k"])

    # a different K on the same store: one-line config error, exit 2, store untouched
    snapshot = (store / "rank0.jsonl").read_text()
    proc = _run(_eval_command(checkpoint, out, items, samples=K + 1), tmp_path, expect=2)
    assert "samples: stored 3, now 4" in proc.stderr
    assert (store / "rank0.jsonl").read_text() == snapshot


def test_offline_st_data_then_reward_model_then_reranking(checkpoint, tmp_path):
    """`megatron-reft offline-st-data`: k samples per train question through the same store; the
    file has every train question's gold record, then its kept samples (each correct, unique).
    Those samples train the reward model (`train-rm`), which `eval --reranker` then uses."""
    from megatron_reft.data import load_records

    out = tmp_path / "st" / "train.jsonl"
    command = [sys.executable, "-m", "megatron_reft.cli", "offline-st-data", "--config", str(TINY),
               "--ckpt", str(checkpoint), "--out", str(out), "--samples", "2", f"trainer.output_dir={tmp_path}",
               "data.synthetic_train_items=8", "ppo.generation_micro_batch=8", *COMMON]
    summary = _json_line(_run(command, tmp_path).stdout)
    stored = {item["id"]: item for item in _lines(Path(str(out) + ".samples"))}
    assert len(stored) == 8 and all(len(item["samples"]) == 2 for item in stored.values())
    records, _ = load_records(str(out), "ncot")
    gold = [r for r in records if "-s" not in r.id]
    assert len(gold) == summary["questions"] == 8 and summary["records"] == len(records)
    correct = sum(s["correct"] for item in stored.values() for s in item["samples"])
    assert summary["samples_kept"] <= correct and summary["sampled_now_rank0"] == 8
    # (resuming the store is the same code as the evaluation's: tested above)

    # the reward model on those train samples, initialised from the SFT checkpoint
    rm_dir = tmp_path / "rm"
    _run([sys.executable, "-m", "megatron_reft.cli", "train-rm", "--config", str(TINY),
          "--samples-dir", str(out) + ".samples", f"model.load={checkpoint}", f"trainer.output_dir={rm_dir}",
          "data.synthetic_train_items=8", "trainer.epochs=1", "trainer.global_batch_size=8",
          "data.max_total_length=256", *COMMON], tmp_path)  # + EOS on responses cut at 192
    rm_rows = [json.loads(x) for x in (rm_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rm_rows] == [1, 2]  # 16 samples / batch 8
    rm_ckpt = rm_dir / "checkpoints" / "step_2"

    # reranking: rerank_at_k beside maj/pass; P(correct) recomputed from the stored samples agrees
    eval_out = tmp_path / "rerank" / "predictions.jsonl"
    line = _json_line(_run(_eval_command(checkpoint, eval_out, items=4) + ["--reranker", str(rm_ckpt)],
                           tmp_path).stdout)
    items = _lines(eval_out.with_suffix(".samples"))
    assert 0.0 <= line["rerank_at_k"] <= line["pass_at_k"]
    assert sum(any(s["correct"] for s in i["samples"]) for i in items) / 4 >= line["rerank_at_k"]
    # an SFT checkpoint has no classification head: refused, one line, exit 2
    proc = _run(_eval_command(checkpoint, tmp_path / "bad" / "p.jsonl", items=4) + ["--reranker", str(checkpoint)],
                tmp_path, expect=2)
    assert "has no classification head" in proc.stderr


def test_eval_with_cuda_graph_decode_samples_and_predicts_as_without(checkpoint, tmp_path):
    """model.cuda_graph_decode: the eval job's greedy and sampled decoding go through the
    fixed-shape step (eager on CPU) and produce the same predictions and samples (fp32)."""
    runs = {}
    for on in (False, True):
        out = tmp_path / str(on) / "predictions.jsonl"
        command = _eval_command(checkpoint, out, items=4) + [f"model.cuda_graph_decode={str(on).lower()}"]
        line = _json_line(_run(command, tmp_path).stdout)
        runs[on] = (line, out.read_text(), sorted(_lines(out.with_suffix(".samples")), key=lambda x: x["id"]))
    (line_off, greedy_off, samples_off), (line_on, greedy_on, samples_on) = runs[False], runs[True]
    assert greedy_on == greedy_off and samples_on == samples_off
    assert (line_on["accuracy"], line_on["maj_at_k"]) == (line_off["accuracy"], line_off["maj_at_k"])

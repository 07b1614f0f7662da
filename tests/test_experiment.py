"""`megatron-reft experiment` (issue 13 item 5): Tables 1 and 2 in reft.md §8's layout from run
directories holding what our jobs write (metrics.jsonl rows, eval JSON lines), hand-checked
numbers, "–" cells with their reasons, one-line config errors, and one real `--run` (a tiny SFT,
then `eval --samples` of its best checkpoint) whose numbers the tables must repeat."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def _cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "megatron_reft.cli", "experiment", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _metrics(run_dir: Path, evals: list[tuple[int, float, float]], steps_per_epoch: int = 2) -> Path:
    """metrics.jsonl as the trainers write it: one row per step, eval_accuracy on evaluation steps."""
    run_dir.mkdir(parents=True)
    rows, accuracy = [], dict((s, a) for s, _, a in evals)
    last = max(s for s, _, _ in evals) if evals else 2
    for step in range(1, last + 1):
        row = {"step": step, "epoch": step / steps_per_epoch, "loss": 1.0 / step, "lr": 1e-5, "step_time": 0.1}
        if step in accuracy:
            row["eval_accuracy"] = accuracy[step]
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def _eval_line(path: Path, accuracy: float, maj: float, rerank: float | None = None, k: int = 4) -> Path:
    line = {"checkpoint": "x/checkpoints/best", "n": 8, "accuracy": accuracy, "predictions": "p.jsonl", "k": k,
            "temperature": 1.0, "maj_at_k": maj, "pass_at_k": 0.9, "sampled_items": 8, "sampled_now": 8,
            "samples_dir": "s"}
    if rerank is not None:
        line["rerank_at_k"] = rerank
    path.write_text("some log line\n" + json.dumps(line) + "\n")
    return path


@pytest.fixture
def experiment(tmp_path):
    """Four methods on GSM8K P-CoT (+ SFT on SVAMP N-CoT), voting for SFT and ReFT, reranking for ReFT."""
    runs = tmp_path / "runs"
    _metrics(runs / "sft", [(2, 1.0, 0.25), (4, 2.0, 0.5), (6, 3.0, 0.5), (8, 4.0, 0.375)])  # best: epoch 2
    _metrics(runs / "sft_svamp", [(2, 1.0, 0.125)])
    _metrics(runs / "offline", [(2, 1.0, 0.3125), (4, 2.0, 0.4375)])
    _metrics(runs / "online", [(3, 1.5, 0.5625), (6, 3.0, 0.53125)])
    _metrics(runs / "reft", [(5, 2.5, 0.625), (10, 5.0, 0.6875)])
    _metrics(runs / "no_eval", [])  # trained without evaluations
    evals = tmp_path / "evals"
    evals.mkdir()
    _eval_line(evals / "sft.jsonl", 0.5, 0.5625)
    _eval_line(evals / "reft.jsonl", 0.6875, 0.75, rerank=0.8125)
    m = "Tiny"
    config = {"output_dir": str(tmp_path / "out"),
              "table1": [{"model": m, "method": "reft", "dataset": "gsm8k", "cot": "pcot",
                          "run_dir": str(runs / "reft")},
                         {"model": m, "method": "sft", "dataset": "gsm8k", "cot": "pcot", "run_dir": str(runs / "sft")},
                         {"model": m, "method": "offline-st", "dataset": "gsm8k", "cot": "pcot",
                          "run_dir": str(runs / "offline")},
                         {"model": m, "method": "online-st", "dataset": "gsm8k", "cot": "pcot",
                          "run_dir": str(runs / "online"), "select": "last"},
                         {"model": m, "method": "sft", "dataset": "svamp", "cot": "ncot",
                          "run_dir": str(runs / "sft_svamp")},
                         {"model": m, "method": "reft", "dataset": "svamp", "cot": "ncot",
                          "run_dir": str(runs / "no_eval")},
                         {"model": m, "method": "online-st", "dataset": "svamp", "cot": "ncot",
                          "run_dir": str(runs / "never_started")}],
              "table2": [{"model": m, "method": "sft", "dataset": "gsm8k", "cot": "pcot",
                          "eval_json": str(evals / "sft.jsonl")},
                         {"model": m, "method": "reft", "dataset": "gsm8k", "cot": "pcot",
                          "eval_json": str(evals / "reft.jsonl")}]}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_tables_have_the_papers_layout_and_the_hand_checked_numbers(experiment, tmp_path):
    proc = _cli(["--config", str(experiment)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    md = (out / "tables.md").read_text()
    assert proc.stdout == md
    assert ("| | GSM8K N | GSM8K P | SVAMP N | SVAMP P | MathQA-MCQ N | MathQA-MCQ P |\n"
            "|---|---|---|---|---|---|---|\n"
            "| Tiny SFT | – | 50.00 | 12.50 | – | – | – |\n"  # best of 4 epochs (0.5 at epochs 2 and 3)
            "| Tiny Offline Self-Training | – | 43.75 | – | – | – | – |\n"
            "| Tiny Online Self-Training | – | 53.12 | – | – | – | – |\n"  # select: last
            "| Tiny ReFT | – | 68.75 | – | – | – | – |\n") in md
    assert ("| | GSM8K P |\n|---|---|\n"
            "| Tiny SFT + Voting@4 | 56.25 |\n| Tiny ReFT + Voting@4 | 75.00 |\n"
            "| Tiny SFT + Reranking@4 | – |\n| Tiny ReFT + Reranking@4 | 81.25 |\n") in md
    result = json.loads((out / "tables.json").read_text())
    rows = {r["label"]: r["cells"] for r in result["table1"]["rows"]}
    sft = rows["Tiny SFT"]["gsm8k/pcot"]
    assert (sft["value"], sft["epoch"], sft["step"], sft["evaluations"]) == (0.5, 2.0, 4, 4)  # the first best
    assert rows["Tiny ReFT"]["gsm8k/ncot"]["reason"] == "not in the experiment config"
    assert "no eval_accuracy logged" in rows["Tiny ReFT"]["svamp/ncot"]["reason"]
    assert "no metrics.jsonl" in rows["Tiny Online Self-Training"]["svamp/ncot"]["reason"]
    rerank = {r["label"]: r["cells"] for r in result["table2"]["rows"]}["Tiny SFT + Reranking@4"]["gsm8k/pcot"]
    assert "no rerank_at_k (eval ran without --reranker)" in rerank["reason"]
    curves = result["curves"]["gsm8k/pcot"]
    assert [p["accuracy"] for p in curves["Tiny ReFT"]] == [0.625, 0.6875]
    plot = result["plot"]
    try:
        import matplotlib  # noqa: F401
        assert (out / plot["file"]).is_file() and "![accuracy over epochs](accuracy_over_epochs.png)" in md
    except ImportError:
        assert "matplotlib" in plot["note"] and "(no plot:" in md


@pytest.mark.parametrize("text, message", [
    ("output_dir: o\ntable1: [{model: M, method: dpo, dataset: gsm8k, cot: pcot, run_dir: r}]\n",
     "table1[0].method: 'dpo' is not one of sft, offline-st, online-st, reft"),
    ("output_dir: o\ntable1: [{model: M, method: sft, dataset: gsm8k, cot: pcot}]\n",
     "table1[0]: needs run_dir (metrics.jsonl) or eval_json (an eval JSON line)"),
    ("output_dir: o\ntable1: [{model: M, method: sft, dataset: gsm8k, cot: p, run_dir: r}]\n",
     "table1[0].cot: 'p' is not one of ncot, pcot"),
    ("output_dir: o\ntable2: [{model: M, method: offline-st, dataset: gsm8k, cot: pcot, eval_json: e}]\n",
     "table2[0].method: 'offline-st' is not one of sft, reft"),
    ("output_dir: o\ntable2: [{model: M, method: sft, dataset: gsm8k, cot: pcot, eval_json: e, samples: 0}]\n",
     "table2[0].samples: must be >= 1, got 0"),
    ("output_dir: o\ntable2: [{model: M, method: sft, dataset: gsm8k, cot: pcot}]\n", "table2[0].eval_json: missing"),
    ("output_dir: o\ntable1: [{model: M, method: sft, dataset: gsm8k, cot: pcot, run_dir: r, epochs: 3}]\n",
     "table1[0].epochs: unknown key"),
    ("output_dir: o\ntable1:\n - {model: M, method: sft, dataset: d, cot: pcot, run_dir: a}\n"
     " - {model: M, method: sft, dataset: d, cot: pcot, run_dir: b}\n", "table1[1]: same model/method/dataset/cot"),
    ("output_dir: o\ntable1: [{model: M, method: sft, dataset: d, cot: pcot, run_dir: r, overrides: a=1}]\n",
     "table1[0].overrides: expected a list of strings"),
    ("table1: [{model: M, method: sft, dataset: d, cot: pcot, run_dir: r}]\n", "output_dir: missing"),
    ("output_dir: o\n", "table1, table2: both empty"),
    ("output_dir: o\ntable1: {model: M}\n", "table1: expected a list of entries"),
    ("output_dir: [o\n", "not valid YAML"),
    ("output_dir: o\ntable1: [{model: M, method: sft, dataset: d, cot: pcot, run_dir: r, eval_json: e, config: c}]\n",
     "table1[0].eval_json: config trains run_dir; to fill eval_json, give commands"),
])
def test_a_bad_experiment_config_is_one_line_and_exit_2(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = _cli(["--config", str(path)], tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"megatron-reft experiment: {path}: ")
    assert not (tmp_path / "o").exists()


def test_run_refuses_a_missing_recipe_before_running_anything(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("output_dir: o\ntable1: [{model: M, method: sft, dataset: d, cot: ncot, run_dir: r, "
                    "config: nope.yaml}]\n")
    proc = _cli(["--config", str(path), "--run"], tmp_path)
    assert proc.returncode == 2 and "table1[0].config: no such file: nope.yaml" in proc.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


SMALL = ["data.synthetic_train_items=32", "data.synthetic_eval_items=4", "trainer.progress_bar=false",
         "trainer.tensorboard=false"]


def test_run_trains_evaluates_and_tabulates_a_tiny_experiment(tmp_path):
    """--run: a tiny SFT (2 epochs of 2 steps, greedy accuracy at each) and `eval --samples 2` of
    its best checkpoint; the tables repeat the numbers the jobs logged and printed. A second
    --run finds everything present and runs nothing."""
    sft_dir = tmp_path / "runs" / "sft"
    config = {"output_dir": "out",
              "table1": [{"model": "Tiny", "method": "sft", "dataset": "synthetic", "cot": "ncot",
                          "run_dir": "runs/sft", "config": str(TINY), "overrides": SMALL}],
              "table2": [{"model": "Tiny", "method": "sft", "dataset": "synthetic", "cot": "ncot",
                          "eval_json": "evals/sft.jsonl", "config": str(TINY), "ckpt": "runs/sft/checkpoints/best",
                          "samples": 2, "overrides": SMALL + ["trainer.output_dir=evals"]}]}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(config))
    proc = _cli(["--config", "e.yaml", "--run"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logged = [json.loads(x)["eval_accuracy"] for x in (sft_dir / "metrics.jsonl").read_text().splitlines()
              if "eval_accuracy" in x]
    assert len(logged) == 2  # tiny_cpu: 2 epochs
    line = json.loads((tmp_path / "evals" / "sft.jsonl").read_text().splitlines()[-1])
    assert line["accuracy"] == max(logged)  # `best` re-evaluated greedily: the same number
    result = json.loads((tmp_path / "out" / "tables.json").read_text())
    table1 = result["table1"]
    assert [c["label"] for c in table1["columns"]][-1] == "synthetic N"
    assert table1["rows"][0]["cells"]["synthetic/ncot"]["value"] == max(logged)
    voting = result["table2"]["rows"][0]
    assert voting["label"] == "Tiny SFT + Voting@2" and voting["cells"]["synthetic/ncot"]["value"] == line["maj_at_k"]
    again = _cli(["--config", "e.yaml", "--run"], tmp_path)
    assert again.returncode == 0 and "experiment: running" not in again.stderr


def test_shipped_experiment_files_parse_and_name_the_recipes_run_directories():
    from megatron_reft.config import load_config
    from megatron_reft.experiment.spec import load_experiment

    recipe_of = {"sft": "sft-best", "offline-st": "offline-st", "online-st": "online-st", "reft": "ppo"}
    for path in sorted((REPO / "configs" / "experiments").glob("*.yaml")):
        experiment = load_experiment(str(path))
        for entry in experiment.table1 + experiment.table2:
            assert entry.config is None or (REPO / entry.config).is_file(), (path.name, entry.config)
    seven_b = load_experiment(str(REPO / "configs" / "experiments" / "codellama-7b.yaml"))
    assert len(seven_b.table1) == 7 * 4  # every paper run × SFT, Offline-ST, Online-ST, ReFT
    for e in seven_b.table1:
        recipe = REPO / "configs" / f"codellama-7b_{e.dataset}_{e.cot}_{recipe_of[e.method]}.yaml"
        assert load_config(recipe).trainer.output_dir == e.run_dir, recipe.name


def test_run_resolves_run_directories_to_their_latest_checkpoint(tmp_path):
    from megatron_reft.experiment.cli import table2_commands
    from megatron_reft.experiment.spec import Table2Entry

    for run in ("ppo", "rm"):
        (tmp_path / run / "checkpoints" / "step_7").mkdir(parents=True)
        (tmp_path / run / "checkpoints" / "latest").write_text("step_7\n")
    entry = Table2Entry(model="M", method="reft", dataset="gsm8k", cot="pcot", eval_json=str(tmp_path / "e.jsonl"),
                        config="c.yaml", ckpt=str(tmp_path / "ppo"), samples=5,
                        reranker=str(tmp_path / "rm" / "checkpoints"), overrides=["a.b=1"])
    assert table2_commands(entry) == [[
        "eval", "--config", "c.yaml", "--ckpt", str(tmp_path / "ppo" / "checkpoints" / "step_7"), "--samples", "5",
        "--temperature", "1.0", "--out", str(tmp_path / "e.predictions.jsonl"),
        "--reranker", str(tmp_path / "rm" / "checkpoints" / "step_7"), "a.b=1"]]

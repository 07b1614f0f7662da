"""The tiny-task matrix over seeds (issue 13 item 6): SFT best epoch vs ReFT, plus the paper's
baselines (online and offline self-training, majority voting@k, reward-model reranking@k) and
ablations (β = 0, no partial reward), all on the quickstart's task (configs/demo_cpu*.yaml,
synthetic level 6 "held-out equations") and the same held-out items.

    python scripts/tiny_matrix.py --out runs/tiny_matrix [--seeds 1234 1 2]
        [--methods reft online_st beta0 no_partial offline_st voting rerank]
        [--ppo-steps 60] [--k-train 8] [--k-eval 16] [--collect-only] [--override key=value ...]

Per seed: `megatron-reft demo` (one SFT run: greedy held-out accuracy every epoch → SFT best, and
the warm-up = the last SFT epoch; ReFT PPO from the warm-up), then each extra RL method from the
same warm-up in its own run directory, and:

- offline_st: `offline-st-data` (--k-train samples per train question from the warm-up at T = 1,
  ≤ 10 unique correct + gold; store in st_data/), then `sft` on that file from the base model (the
  random init of the demo's SFT: same recipe, seed and epochs), held-out accuracy of its best epoch;
- voting: `eval --samples K` (K = --k-eval, T = 1) of SFT-best and of ReFT's last checkpoint:
  maj@K, pass@K;
- rerank: `train-rm` from the warm-up on st_data/'s train samples, then the same evals with
  `--reranker` (they reuse voting's samples): rerank@K.

Finished runs are skipped, so rerunning the command continues a matrix. Writes OUT/matrix.md and
OUT/matrix.json. `--override` goes to every command (a smoke test on a smaller task).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "configs" / "demo_cpu.yaml"
PPO_RECIPE = REPO / "configs" / "demo_cpu_ppo.yaml"
QUIET = ["trainer.progress_bar=false", "trainer.tensorboard=false"]
# method -> (command, overrides on top of the ReFT recipe)
EXTRA = {
    "online_st": ("online-st", []),
    "beta0": ("ppo", ["ppo.kl_coef=0"]),
    "no_partial": ("ppo", ["reward.partial_reward=0"]),
}
SAMPLED = ["offline_st", "voting", "rerank"]  # methods built on sampled CoTs (run after the RL ones)
LABELS = {"sft_best": "SFT (best epoch)", "warmup": "warm-up", "reft": "ReFT", "online_st": "Online-ST",
          "beta0": "ReFT β=0", "no_partial": "ReFT no partial reward", "offline_st": "Offline-ST (best epoch)"}
SAMPLED_OF = {"sft_best": "SFT (best epoch)", "reft": "ReFT"}  # the checkpoints voting/rerank sample from
RM = {"optim.lr": "2e-4", "optim.schedule": "constant", "trainer.epochs": "1",  # the reranker's recipe
      "trainer.global_batch_size": "64", "trainer.micro_batch_size": "64"}


def _cli(*args: str, json_out: Path | None = None) -> None:
    """Run one megatron-reft command; with json_out, also save its last stdout line (a JSON summary)."""
    command = [sys.executable, "-m", "megatron_reft.cli", *args]
    print("+", " ".join(command), flush=True)
    if json_out is None:
        subprocess.run(command, cwd=REPO, check=True)
        return
    done = subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", flush=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(line + "\n")


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _eval_rows(run_dir: Path, key: str = "eval_accuracy") -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if key in r]


def _finished(run_dir: Path, steps: int) -> bool:
    rows = _eval_rows(run_dir)
    return bool(rows) and rows[-1]["step"] >= steps


def run_seed(out: Path, seed: int, methods: list[str], ppo_steps: int, k_train: int, k_eval: int,
             overrides: list[str] = ()) -> None:
    seed_dir = out / f"seed{seed}"
    common = [f"trainer.seed={seed}", *QUIET, *overrides]
    if not (seed_dir / "summary.json").is_file():
        _cli("demo", "--out", str(seed_dir), *common, "--ppo", f"trainer.max_steps={ppo_steps}")
    warmup = json.loads((seed_dir / "summary.json").read_text())["warmup_checkpoint"]
    from_warmup = [f"data.tokenizer={warmup}/tokenizer", *common]
    for method in methods:
        if method == "reft" or method in SAMPLED or _finished(seed_dir / method, ppo_steps):
            continue
        command, extra = EXTRA[method]
        _cli(command, "--config", str(PPO_RECIPE), f"trainer.output_dir={seed_dir / method}",
             f"model.load={warmup}", f"trainer.max_steps={ppo_steps}", *from_warmup, *extra)
    if not set(methods) & set(SAMPLED):
        return
    samples = seed_dir / "st_data" / "train.jsonl"  # the warm-up's samples of the train questions
    if not samples.is_file():
        _cli("offline-st-data", "--config", str(SFT_RECIPE), "--ckpt", warmup, "--out", str(samples),
             "--samples", str(k_train), "--temperature", "1.0", "--max-kept", "10",
             f"trainer.output_dir={samples.parent}", *from_warmup, json_out=samples.with_suffix(".json"))
    if "offline_st" in methods and _offline_st_epochs(seed_dir) < _sft_epochs(seed_dir):
        # SFT from the base: no model.load, so the demo SFT's random init (same seed, same tokenizer)
        _cli("sft", "--config", str(SFT_RECIPE), f"trainer.output_dir={seed_dir / 'offline_st'}",
             f"data.train_file={samples}", f"data.eval_file={heldout_file(out, overrides)}",
             "trainer.eval_accuracy=true", *from_warmup)
    if "rerank" in methods and not _rm_checkpoint(seed_dir):
        _cli("train-rm", "--config", str(SFT_RECIPE), "--samples-dir", f"{samples}.samples",
             f"trainer.output_dir={seed_dir / 'rm'}", f"model.load={warmup}",
             *[f"{k}={v}" for k, v in RM.items()], *from_warmup)
    for name, ckpt in _sampled_checkpoints(seed_dir).items():
        for method in ("voting", "rerank"):
            result = seed_dir / method / f"{name}.json"
            if method not in methods or result.is_file():
                continue
            reranker = ["--reranker", str(_rm_checkpoint(seed_dir))] if method == "rerank" else []
            _cli("eval", "--config", str(SFT_RECIPE), "--ckpt", str(ckpt), "--samples", str(k_eval),
                 "--temperature", "1.0", "--samples-dir", str(seed_dir / "voting" / f"{name}.samples"),
                 "--out", str(result.with_suffix(".predictions.jsonl")), *reranker,
                 f"trainer.output_dir={seed_dir / method}", f"data.tokenizer={ckpt}/tokenizer", *common,
                 json_out=result)


def _sft_epochs(seed_dir: Path) -> int:
    summary = json.loads((seed_dir / "summary.json").read_text())
    return max(int(e) for e in summary["sft_curve"])


def _offline_st_epochs(seed_dir: Path) -> int:
    run = seed_dir / "offline_st"
    return max(sft_epoch_accuracies(run), default=0) if (run / "metrics.jsonl").is_file() else 0


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if ckpt_dir.is_dir() else []


def _rm_checkpoint(seed_dir: Path) -> Path | None:
    """The reward model's checkpoint once train-rm has finished (its last step), else None."""
    rows = _eval_rows(seed_dir / "rm", key="train_accuracy")
    steps = _step_dirs(seed_dir / "rm" / "checkpoints")
    done = rows and steps and rows[-1]["epoch"] >= float(RM["trainer.epochs"]) - 1e-9
    return steps[-1] if done and steps[-1].name == f"step_{rows[-1]['step']}" else None


def _sampled_checkpoints(seed_dir: Path) -> dict[str, Path]:
    """{sft_best: the demo SFT's best checkpoint, reft: ReFT's last one} (the ones that exist)."""
    found = {"sft_best": seed_dir / "sft" / "checkpoints" / "best"}
    ppo_steps = _step_dirs(seed_dir / "ppo" / "checkpoints")
    if ppo_steps:
        found["reft"] = ppo_steps[-1]
    return {name: path for name, path in found.items() if path.is_dir()}


def heldout_file(out: Path, overrides: list[str] = ()) -> Path:
    """The demo's held-out items as a JSONL file, the offline-ST SFT's eval file. (It was written
    because `data.eval_file: synthetic` used to bring the synthetic train split back alongside a
    real train file; runtime.load_data now keeps each split's source, and the file stays so that
    earlier matrices' commands reproduce.)"""
    from megatron_reft.config import load_config
    from megatron_reft.data import make_synthetic_splits
    from megatron_reft.data.loaders import save_records

    path = out / "heldout.jsonl"
    if not path.is_file():
        d = load_config(SFT_RECIPE, list(overrides)).data
        _, held_out = make_synthetic_splits(d.synthetic_train_items, d.synthetic_eval_items, d.synthetic_seed,
                                            d.synthetic_difficulty, d.cot_type)
        save_records(held_out, str(path))
    return path


def seed_results(seed_dir: Path, methods: list[str]) -> dict:
    """{method: {"final": acc, "best": acc}} for one seed (None where not run yet); voting and rerank:
    {"sampled": {checkpoint: eval's JSON line}}."""
    summary = json.loads((seed_dir / "summary.json").read_text())
    results = {"sft_best": {"final": summary["sft_best_accuracy"], "best": summary["sft_best_accuracy"]},
               "warmup": {"final": summary["warmup_accuracy"], "best": summary["warmup_accuracy"]}}
    if summary.get("sft_best_epoch") is not None:
        results["sft_best"]["epoch"] = summary["sft_best_epoch"]
    for method in methods:
        if method == "offline_st":  # reported like SFT: its best epoch
            curve = sft_epoch_accuracies(seed_dir / method) if (seed_dir / method / "metrics.jsonl").is_file() else {}
            best = max(curve, key=lambda e: (curve[e], -e), default=None)
            results[method] = None if best is None else {"final": curve[best], "best": curve[best], "epoch": best,
                                                         "epochs": max(curve)}
        elif method not in SAMPLED:
            rows = _eval_rows(seed_dir / ("ppo" if method == "reft" else method))
            results[method] = ({"final": rows[-1]["eval_accuracy"], "best": max(r["eval_accuracy"] for r in rows),
                                "steps": rows[-1]["step"]} if rows else None)
    results["sampled"] = {name: {**(_read_json(seed_dir / "voting" / f"{name}.json") or {}),
                                 **(_read_json(seed_dir / "rerank" / f"{name}.json") or {})} for name in SAMPLED_OF}
    return results


def sft_epoch_accuracies(run_dir: Path) -> dict[int, float]:
    from megatron_reft.demo import sft_epoch_accuracies as curve

    return curve(run_dir)


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _cell(result, ppo_steps: int) -> str:
    if not result:
        return "–"
    if "epoch" in result:  # a best epoch (SFT, offline-ST)
        return _percent(result["final"]) + f" (epoch {result['epoch']})"
    unfinished = result.get("steps", ppo_steps) < ppo_steps  # a run still going: its latest evaluation
    return _percent(result["final"]) + (f" (step {result['steps']})" if unfinished else "")


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def sampled_table(per_seed: dict) -> tuple[str, dict]:
    """Greedy, maj@k, pass@k and rerank@k of SFT-best and ReFT per seed, and their means."""
    metrics = [("accuracy", "greedy"), ("maj_at_k", "maj@k"), ("pass_at_k", "pass@k"), ("rerank_at_k", "rerank@k")]
    columns = [(name, key) for name in SAMPLED_OF for key, _ in metrics]
    ks = sorted({r["sampled"][n]["k"] for r in per_seed.values() for n in SAMPLED_OF if "k" in r["sampled"][n]})
    lines = [f"k = {', '.join(map(str, ks)) or '–'} samples per question at T = 1", "",
             "| seed | " + " | ".join(f"{SAMPLED_OF[n]} {label}" for n in SAMPLED_OF for _, label in metrics) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for seed, results in per_seed.items():
        lines.append(f"| {seed} | " + " | ".join(_percent(results["sampled"][n].get(key)) for n, key in columns) + " |")
    means = {f"{n}.{key}": _mean([r["sampled"][n].get(key) for r in per_seed.values()]) for n, key in columns}
    lines.append(f"| mean of {len(per_seed)} | " + " | ".join(f"**{_percent(means[f'{n}.{key}'])}**"
                                                              for n, key in columns) + " |")
    return "\n".join(lines) + "\n", means


def table(out: Path, seeds: list[int], methods: list[str], ppo_steps: int) -> tuple[str, dict]:
    columns = ["sft_best", "warmup", *[m for m in methods if m not in ("voting", "rerank")]]
    per_seed = {seed: seed_results(out / f"seed{seed}", methods)
                for seed in seeds if (out / f"seed{seed}" / "summary.json").is_file()}
    lines = ["| seed | " + " | ".join(LABELS[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for seed, results in per_seed.items():
        cells = [_cell(results[c], ppo_steps) for c in columns]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = {c: _mean([r[c]["final"] for r in per_seed.values() if r[c]]) for c in columns}
    lines.append(f"| mean of {len(per_seed)} | " + " | ".join(f"**{_percent(means[c])}**" for c in columns) + " |")
    markdown = "\n".join(lines) + "\n"
    if {"voting", "rerank"} & set(methods):
        sampled, means["sampled"] = sampled_table(per_seed)
        markdown += "\n" + sampled
    return markdown, {"per_seed": per_seed, "mean": means}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tiny_matrix")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["reft", *EXTRA, *SAMPLED], choices=["reft", *EXTRA, *SAMPLED])
    parser.add_argument("--ppo-steps", type=int, default=60, help="rollout batches per RL method (demo: 60)")
    parser.add_argument("--k-train", type=int, default=8, help="samples per train question: offline-ST, reranker")
    parser.add_argument("--k-eval", type=int, default=16, help="samples per held-out question: voting, reranking")
    parser.add_argument("--override", nargs="*", default=[], help="key=value for every command (smoke tests)")
    parser.add_argument("--collect-only", action="store_true", help="only write the table from finished runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.collect_only:
        for seed in args.seeds:
            run_seed(out, seed, args.methods, args.ppo_steps, args.k_train, args.k_eval, args.override)
    markdown, data = table(out, args.seeds, args.methods, args.ppo_steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.md").write_text(markdown)
    (out / "matrix.json").write_text(json.dumps(data, indent=2) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tiny-task matrix over seeds (issue 13 item 6): SFT best epoch vs ReFT, plus online
self-training and the paper's ablations (β = 0, no partial reward), all on the quickstart's task
(configs/demo_cpu*.yaml, synthetic level 6 "held-out equations") and the same held-out items.

    python scripts/tiny_matrix.py --out runs/tiny_matrix [--seeds 1234 1 2] [--methods reft online_st beta0 no_partial]
                                  [--ppo-steps 60] [--collect-only]

Per seed: `megatron-reft demo` (one SFT run: greedy held-out accuracy every epoch → SFT best, and
the warm-up = the last SFT epoch; ReFT PPO from the warm-up), then each extra method from the same warm-up in
its own run directory. Finished runs are skipped, so rerunning the command continues a matrix.
Writes OUT/matrix.md and OUT/matrix.json (final and best held-out greedy accuracy per method).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PPO_RECIPE = REPO / "configs" / "demo_cpu_ppo.yaml"
QUIET = ["trainer.progress_bar=false", "trainer.tensorboard=false"]
# method -> (command, overrides on top of the ReFT recipe)
EXTRA = {
    "online_st": ("online-st", []),
    "beta0": ("ppo", ["ppo.kl_coef=0"]),
    "no_partial": ("ppo", ["reward.partial_reward=0"]),
}
LABELS = {"sft_best": "SFT (best epoch)", "warmup": "warm-up", "reft": "ReFT", "online_st": "Online-ST",
          "beta0": "ReFT β=0", "no_partial": "ReFT no partial reward"}


def _cli(*args: str) -> None:
    command = [sys.executable, "-m", "megatron_reft.cli", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def _eval_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "eval_accuracy" in r]


def _finished(run_dir: Path, steps: int) -> bool:
    rows = _eval_rows(run_dir)
    return bool(rows) and rows[-1]["step"] >= steps


def run_seed(out: Path, seed: int, methods: list[str], ppo_steps: int) -> None:
    seed_dir = out / f"seed{seed}"
    if not (seed_dir / "summary.json").is_file():
        _cli("demo", "--out", str(seed_dir), f"trainer.seed={seed}", *QUIET,
             "--ppo", f"trainer.max_steps={ppo_steps}")
    warmup = json.loads((seed_dir / "summary.json").read_text())["warmup_checkpoint"]
    for method in methods:
        if method == "reft" or _finished(seed_dir / method, ppo_steps):
            continue
        command, overrides = EXTRA[method]
        _cli(command, "--config", str(PPO_RECIPE), f"trainer.output_dir={seed_dir / method}",
             f"model.load={warmup}", f"data.tokenizer={warmup}/tokenizer", f"trainer.seed={seed}",
             f"trainer.max_steps={ppo_steps}", *QUIET, *overrides)


def seed_results(seed_dir: Path, methods: list[str]) -> dict:
    """{method: {"final": acc, "best": acc}} for one seed (None where not run yet)."""
    summary = json.loads((seed_dir / "summary.json").read_text())
    results = {"sft_best": {"final": summary["sft_best_accuracy"], "best": summary["sft_best_accuracy"]},
               "warmup": {"final": summary["warmup_accuracy"], "best": summary["warmup_accuracy"]}}
    for method in methods:
        rows = _eval_rows(seed_dir / ("ppo" if method == "reft" else method))
        results[method] = ({"final": rows[-1]["eval_accuracy"], "best": max(r["eval_accuracy"] for r in rows),
                            "steps": rows[-1]["step"]} if rows else None)
    return results


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _cell(result, ppo_steps: int) -> str:
    if not result:
        return "–"
    unfinished = result.get("steps", ppo_steps) < ppo_steps  # a run still going: its latest evaluation
    return _percent(result["final"]) + (f" (step {result['steps']})" if unfinished else "")


def table(out: Path, seeds: list[int], methods: list[str], ppo_steps: int) -> tuple[str, dict]:
    columns = ["sft_best", "warmup", *methods]
    per_seed = {seed: seed_results(out / f"seed{seed}", methods)
                for seed in seeds if (out / f"seed{seed}" / "summary.json").is_file()}
    lines = ["| seed | " + " | ".join(LABELS[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for seed, results in per_seed.items():
        cells = [_cell(results[c], ppo_steps) for c in columns]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = {}
    for c in columns:
        values = [r[c]["final"] for r in per_seed.values() if r[c] and r[c]["final"] is not None]
        means[c] = statistics.mean(values) if values else None
    lines.append(f"| mean of {len(per_seed)} | " + " | ".join(f"**{_percent(means[c])}**" for c in columns) + " |")
    return "\n".join(lines) + "\n", {"per_seed": per_seed, "mean": means}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tiny_matrix")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["reft", *EXTRA], choices=["reft", *EXTRA])
    parser.add_argument("--ppo-steps", type=int, default=60, help="rollout batches per RL method (demo: 60)")
    parser.add_argument("--collect-only", action="store_true", help="only write the table from finished runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not args.collect_only:
        for seed in args.seeds:
            run_seed(out, seed, args.methods, args.ppo_steps)
    markdown, data = table(out, args.seeds, args.methods, args.ppo_steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.md").write_text(markdown)
    (out / "matrix.json").write_text(json.dumps(data, indent=2) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

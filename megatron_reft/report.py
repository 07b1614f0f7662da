"""Plots and a markdown report from run directories' metrics.jsonl.

`megatron-reft report RUN_DIR [RUN_DIR ...] --out DIR`: PNG curves of reward, accuracy, KL and
response length (PPO) or loss (SFT) over steps, and a report.md that embeds them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_reft.reliability.errors import EXIT_FAULT
from megatron_reft.reliability.storage import STORAGE_ERRNOS, describe_failure, naming, write_text_durably

PPO_PANELS = [("reward_mean", "reward (mean over rollout)"), ("accuracy", "training accuracy"),
              ("eval_accuracy", "held-out greedy accuracy"), ("kl", "KL to reference (per sequence)"),
              ("response_length", "response length (tokens)"), ("explained_variance", "value explained variance")]
SFT_PANELS = [("loss", "train loss"), ("eval_loss", "held-out loss"), ("lr", "learning rate")]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_panels(rows: list[dict], panels: list[tuple[str, str]], title: str, out_png: Path) -> bool:
    try:
        import matplotlib  # optional: pip install 'megatron-reft[plots]'
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, label) for k, label in panels if any(r.get(k) is not None for r in rows)]
    if not panels:
        return False
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return True


def write_report(run_dirs: list[str | Path], out_dir: str | Path, summary: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# megatron-reft run report", ""]
    if summary:
        lines += ["## Summary", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()
                  if not isinstance(v, (dict, list))]
        lines.append("")
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        if not rows:
            continue
        name = Path(run_dir).name
        is_ppo = any("reward_mean" in r for r in rows)
        png = out_dir / f"{name}.png"
        title = f"{name} ({'PPO' if is_ppo else 'SFT'})"
        with naming(png):  # a full disk names the file (matplotlib's failed write does not)
            plotted = plot_panels(rows, PPO_PANELS if is_ppo else SFT_PANELS, title, png)
        if plotted:
            lines += [f"## {name}", "", f"![{name}]({png.name})", ""]
        last = rows[-1]
        timing = {k: v for k, v in last.items() if k.startswith("time_")}
        if timing:
            lines += ["Last step's phase timings (s): " + ", ".join(f"{k[5:]} {v:.3g}" for k, v in timing.items()), ""]
    path = out_dir / "report.md"
    write_text_durably(path, "\n".join(lines) + "\n")  # a full disk leaves the previous report whole
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-reft report", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", required=True, help="directory for report.md and PNGs")
    args = parser.parse_args(argv)
    for run_dir in args.runs:
        problem = run_dir_problem(run_dir)
        if problem:
            print(f"megatron-reft report: {run_dir}: {problem}", file=sys.stderr)
            return 2
    try:
        print(write_report(args.runs, args.out))
    except OSError as err:  # disk full, read-only: one line with the path and errno (docs/reliability.md)
        if err.errno not in STORAGE_ERRNOS:
            raise
        print(f"megatron-reft report: {describe_failure(err, err.filename or args.out)}", file=sys.stderr)
        return EXIT_FAULT
    return 0


def run_dir_problem(run_dir: str | Path) -> str | None:
    """Why a run directory cannot be reported on (None when it can)."""
    path = Path(run_dir)
    if not path.is_dir():
        return "no such run directory"
    if not read_metrics(path):
        return "no metrics (metrics.jsonl is missing or empty: has a job run here yet?)"
    return None

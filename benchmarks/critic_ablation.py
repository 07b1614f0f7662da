"""Shared trunk vs separate value model at equal PPO steps (issue 12; reft.md §4, §8), on the
tiny CPU task: one warm-up SFT checkpoint (configs/demo_cpu.yaml), then `megatron-reft ppo` per
(critic.mode, seed) from it, all in one process each (the separate critic on the actor's rank:
equal hardware, so the time per step shows its extra compute).

    python benchmarks/critic_ablation.py --out runs/critic_ablation --steps 20 --seeds 1 2 3

Prints a markdown table (per mode: reward at a few steps, held-out greedy accuracy at the end,
seconds per step, value explained variance over the second half) and writes reward curves to
<out>/reward_curves.png when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "megatron_reft.cli", *args, "trainer.progress_bar=false",
           "trainer.tensorboard=false"]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def warm_up(out: Path) -> Path:
    sft = out / "sft"
    if not (sft / "checkpoints" / "latest").is_file():
        _cli("sft", "--config", "configs/demo_cpu.yaml", f"trainer.output_dir={sft}")
    return sft / "checkpoints" / (sft / "checkpoints" / "latest").read_text().strip()


def ppo(out: Path, warm: Path, mode: str, seed: int, steps: int, rollout: int) -> list[dict]:
    run = out / f"{mode}_seed{seed}"
    if not (run / "metrics.jsonl").is_file():
        _cli("ppo", "--config", "configs/demo_cpu_ppo.yaml", f"trainer.output_dir={run}", f"model.load={warm}",
             f"trainer.seed={seed}", f"critic.mode={mode}", f"trainer.max_steps={steps}",
             f"ppo.rollout_batch_size={rollout}", f"trainer.eval_interval={steps}",
             f"trainer.save_interval={steps}", "data.max_eval_items=100", "trainer.resume=none")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summarise(runs: dict, steps: int) -> str:
    marks = sorted({max(1, steps // 4), steps // 2, 3 * steps // 4, steps})
    head = ("| mode | " + " | ".join(f"reward @{m}" for m in marks)
            + " | eval acc @end | s/step | explained var (2nd half) |")
    lines = [head, "|" + "---|" * (len(marks) + 4)]
    for mode, per_seed in runs.items():
        def mean_over_seeds(fn):
            values = [fn(ms) for ms in per_seed]
            return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        cells = []
        for m in marks:  # reward averaged over a 3-step window around the mark, then over seeds
            mu, sd = mean_over_seeds(lambda ms: statistics.mean(
                x["reward_mean"] for x in ms if m - 2 <= x["step"] <= m))
            cells.append(f"{mu:.3f} ± {sd:.3f}")
        acc, acc_sd = mean_over_seeds(lambda ms: [x for x in ms if x.get("eval_accuracy") is not None][-1]["eval_accuracy"])
        sec, sec_sd = mean_over_seeds(lambda ms: statistics.median(x["step_time"] for x in ms[1:]))
        ev, ev_sd = mean_over_seeds(lambda ms: statistics.mean(x["explained_variance"] for x in ms[len(ms) // 2:]))
        lines.append(f"| {mode} | " + " | ".join(cells)
                     + f" | {acc:.3f} ± {acc_sd:.3f} | {sec:.2f} ± {sec_sd:.2f} | {ev:.3f} ± {ev_sd:.3f} |")
    return "\n".join(lines)


def plot(runs: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for mode, per_seed in runs.items():
        for i, ms in enumerate(per_seed):
            kw = {"label": mode} if i == 0 else {}
            color = "C0" if mode == "shared" else "C1"
            axes[0].plot([x["step"] for x in ms], [x["reward_mean"] for x in ms], color=color, alpha=0.7, **kw)
            axes[1].plot([x["step"] for x in ms], [x["explained_variance"] for x in ms], color=color, alpha=0.7, **kw)
    axes[0].set(xlabel="PPO step", ylabel="mean reward")
    axes[1].set(xlabel="PPO step", ylabel="explained variance", ylim=(-2, 1))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/critic_ablation")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rollout", type=int, default=32, help="prompts per rollout batch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    out = Path(args.out).resolve()
    warm = warm_up(out)
    runs = {mode: [ppo(out, warm, mode, s, args.steps, args.rollout) for s in args.seeds]
            for mode in ("shared", "separate")}
    print(summarise(runs, args.steps))
    plot(runs, out / "reward_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

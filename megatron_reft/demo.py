"""CPU quickstart: synthetic task → tokenizer → SFT (the baseline and the warm-up) → ReFT PPO.

`megatron-reft demo --out DIR` runs the whole ReFT recipe on a tiny model in one process and
writes DIR/summary.json and DIR/report.md. One SFT run gives both the paper's baseline (its best
epoch by held-out greedy accuracy, `sft_best_accuracy`) and the warm-up (an early epoch, the first
of `trainer.keep_epochs`); ReFT PPO starts from the warm-up and is evaluated on the same held-out
items (`reft_accuracy`). The default task (difficulty 6, "held-out equations", docs/data.md) is one
where SFT's best epoch plateaus: held-out items need equations no train CoT shows.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megatron_reft import runtime
from megatron_reft.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
DEMO_PPO_CONFIG = DEMO_CONFIG.with_name("demo_cpu_ppo.yaml")  # inherits demo_cpu.yaml


def _config(base: str | None, out: Path, stage: str, overrides: list[str]):
    return load_config(base or DEMO_CONFIG, [f"trainer.output_dir={out / stage}"] + overrides)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def sft_epoch_accuracies(run_dir: Path) -> dict[int, float]:
    """{epoch: held-out greedy accuracy} from an SFT run's metrics.jsonl (epoch-end rows)."""
    return {round(r["epoch"]): r["eval_accuracy"] for r in _metrics(run_dir)
            if "eval_accuracy" in r and abs(r["epoch"] - round(r["epoch"])) < 1e-9}


def _warmup_epoch(config) -> int:
    if not config.trainer.keep_epochs:
        raise ValueError(f"{DEMO_CONFIG.name}: trainer.keep_epochs must name the warm-up epoch, e.g. [3]")
    return config.trainer.keep_epochs[0]


def _epoch_checkpoint(run_dir: Path, epoch: int) -> Path:
    """The checkpoint written at the end of `epoch` (checkpoints are named by step)."""
    steps = [r["step"] for r in _metrics(run_dir) if abs(r["epoch"] - epoch) < 1e-9]
    ckpt = run_dir / "checkpoints" / f"step_{steps[0] if steps else '?'}"
    if not ckpt.is_dir():
        raise RuntimeError(f"{ckpt}: no checkpoint of epoch {epoch} was kept (trainer.keep_epochs, trainer.epochs)")
    return ckpt


def run_demo(out: Path, base_config: str | None = None, overrides: list[str] = (),
             ppo_overrides: list[str] = (), sft_overrides: list[str] = (),
             ppo_base_config: str | None = None) -> dict:
    from megatron_reft.rl.trainer import PPOTrainer
    from megatron_reft.sft.trainer import run as run_sft

    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = out / "tokenizer"
    common = [f"data.tokenizer={tokenizer_dir}"] if tokenizer_dir.is_dir() else []
    seconds = {}

    # SFT, the paper's baseline and the warm-up in one run (reft.md §5-§6): greedy held-out accuracy
    # at every epoch end; SFT = its best epoch, the warm-up = the epoch trainer.keep_epochs protects
    # (the quickstart: the last, see configs/demo_cpu.yaml for why not an early one).
    runtime.print0("== 1/2 SFT (greedy held-out accuracy every epoch)")
    t0 = time.perf_counter()
    sft_config = _config(base_config, out, "sft", list(overrides) + common + list(sft_overrides)
                         + ["trainer.eval_accuracy=true"])
    sft_config.trainer.output_dir = str(out / "sft")
    warmup_epoch = _warmup_epoch(sft_config)
    run_sft(sft_config)
    seconds["sft"] = time.perf_counter() - t0
    curve = sft_epoch_accuracies(out / "sft")
    warmup_ckpt = _epoch_checkpoint(out / "sft", warmup_epoch)
    best_epoch = max(curve, key=lambda e: (curve[e], -e))  # the first epoch reaching the best accuracy
    runtime.print0(f"SFT held-out accuracy per epoch: {curve}; warm-up = epoch {warmup_epoch}")

    runtime.print0(f"== 2/2 ReFT PPO from the epoch-{warmup_epoch} warm-up")
    t0 = time.perf_counter()
    tokenizer = [f"data.tokenizer={warmup_ckpt / 'tokenizer'}"]
    ppo_config = _config(ppo_base_config or DEMO_PPO_CONFIG, out, "ppo", list(overrides) + tokenizer
                         + list(ppo_overrides) + [f"model.load={warmup_ckpt}", "trainer.resume=none"])
    final = PPOTrainer(ppo_config).train()
    seconds["ppo"] = time.perf_counter() - t0
    reft_accuracy = final.get("eval_accuracy")
    reft_curve = {r["step"]: r["eval_accuracy"] for r in _metrics(out / "ppo") if "eval_accuracy" in r}

    summary = {"sft_best_accuracy": curve[best_epoch], "sft_best_epoch": best_epoch,
               "warmup_accuracy": curve.get(warmup_epoch), "warmup_epoch": warmup_epoch,
               "warmup_checkpoint": str(warmup_ckpt),
               "reft_accuracy": reft_accuracy, "reft_best_accuracy": max(reft_curve.values(), default=None),
               "reft_minus_sft_best": None if reft_accuracy is None else reft_accuracy - curve[best_epoch],
               "sft_curve": {str(e): a for e, a in sorted(curve.items())},
               "reft_curve": {str(s): a for s, a in sorted(reft_curve.items())},
               "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "eval_items": ppo_config.data.synthetic_eval_items,
               "difficulty": ppo_config.data.synthetic_difficulty}
    if runtime.rank() == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from megatron_reft.report import write_report

        flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        flat.update({f"seconds_{k}": v for k, v in summary["seconds"].items()})
        write_report([out / "sft", out / "ppo"], out, flat)
        print(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-reft demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--config", default=None, help=f"SFT/eval recipe (default: {DEMO_CONFIG.name})")
    parser.add_argument("--ppo-config", default=None, help=f"PPO recipe (default: {DEMO_PPO_CONFIG.name})")
    parser.add_argument("--ppo", nargs="*", default=[], help="key=value overrides for the PPO stage only")
    parser.add_argument("--sft", nargs="*", default=[], help="key=value overrides for the SFT stages only")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    args = parser.parse_args(argv)
    summary = run_demo(Path(args.out), args.config, args.overrides, args.ppo, args.sft, args.ppo_config)
    from megatron_reft.distributed.init import shutdown

    shutdown()
    return 0 if summary.get("reft_accuracy") is not None else 1

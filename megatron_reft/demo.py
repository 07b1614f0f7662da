"""CPU quickstart: synthetic task → tokenizer → warm-up SFT → ReFT PPO → evaluation.

`megatron-reft demo --out DIR` runs the whole ReFT recipe on a tiny model in one process and
writes DIR/summary.json and DIR/report.md. The paper's baseline is included: the warm-up model
trained further with SFT for the same wall-clock time PPO took (`sft_continued_accuracy`).
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


def _greedy_eval(config, ckpt: Path) -> tuple[float, int]:
    """(held-out greedy accuracy, number of held-out items)."""
    from megatron_reft.checkpoint.io import load_checkpoint
    from megatron_reft.evaluation.run import greedy_accuracy, make_scorer
    from megatron_reft.engines import build_engine

    runtime.start(config)
    data = runtime.load_data(config, need_train=False)
    engine = build_engine(config, runtime.model_config_for(config, data), optim=False)
    load_checkpoint(ckpt, engine.module)
    with make_scorer(config) as scorer:
        accuracy, _ = greedy_accuracy(engine, data.tokenizer, data.eval, config, scorer)
    return accuracy, len(data.eval)


def _latest(run_dir: Path) -> Path:
    from megatron_reft.checkpoint.io import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise RuntimeError(f"{run_dir}: no checkpoint was written")
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

    runtime.print0("== 1/4 warm-up SFT")
    t0 = time.perf_counter()
    sft_config = _config(base_config, out, "sft", list(overrides) + common + list(sft_overrides))
    sft_config.trainer.output_dir = str(out / "sft")
    run_sft(sft_config)
    seconds["sft"] = time.perf_counter() - t0
    warmup_ckpt = _latest(out / "sft")
    tokenizer = [f"data.tokenizer={warmup_ckpt / 'tokenizer'}"]

    runtime.print0("== 2/4 warm-up accuracy")
    eval_config = _config(base_config, out, "eval", list(overrides) + tokenizer)
    warmup_accuracy, eval_items = _greedy_eval(eval_config, warmup_ckpt)
    runtime.print0(f"warm-up held-out accuracy: {warmup_accuracy:.3f}")

    runtime.print0("== 3/4 ReFT PPO")
    t0 = time.perf_counter()
    ppo_config = _config(ppo_base_config or DEMO_PPO_CONFIG, out, "ppo", list(overrides) + tokenizer
                         + list(ppo_overrides) + [f"model.load={warmup_ckpt}", "trainer.resume=none"])
    final = PPOTrainer(ppo_config).train()
    seconds["ppo"] = time.perf_counter() - t0
    reft_accuracy = final.get("eval_accuracy")

    runtime.print0(f"== 4/4 SFT continued for the same {seconds['ppo']:.0f} s (the paper's baseline)")
    t0 = time.perf_counter()
    cont = _config(base_config, out, "sft_continued", list(overrides) + tokenizer + list(sft_overrides)
                   + [f"model.load={warmup_ckpt}", "trainer.resume=none",
                      f"trainer.max_seconds={seconds['ppo']:.1f}", "trainer.max_steps=100000"])
    run_sft(cont)
    seconds["sft_continued"] = time.perf_counter() - t0
    sft_continued_accuracy, _ = _greedy_eval(eval_config, _latest(out / "sft_continued"))

    summary = {"warmup_accuracy": warmup_accuracy, "reft_accuracy": reft_accuracy,
               "sft_continued_accuracy": sft_continued_accuracy,
               "reft_minus_warmup": None if reft_accuracy is None else reft_accuracy - warmup_accuracy,
               "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "eval_items": eval_items}
    if runtime.rank() == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from megatron_reft.report import write_report

        flat = {k: v for k, v in summary.items() if k != "seconds"}
        flat.update({f"seconds_{k}": v for k, v in summary["seconds"].items()})
        write_report([out / "sft", out / "ppo", out / "sft_continued"], out, flat)
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

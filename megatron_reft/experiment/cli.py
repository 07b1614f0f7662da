"""`megatron-reft experiment --config FILE [--run]`: Tables 1 and 2 of the paper from run
directories and eval outputs (docs/experiment.md).

Without --run it only reads (no torch, seconds). With --run, every entry whose number is missing
and that says how to make it (`config`, or explicit `commands`) is run first, Table 1's entries
(training) before Table 2's (sampled evaluation, which may use Table 1's checkpoints); the jobs
resume by themselves, so rerunning the experiment after an interruption continues where it was.
Writes <output_dir>/tables.md, tables.json and accuracy_over_epochs.png, and prints tables.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from megatron_reft.experiment import collect, tables
from megatron_reft.experiment.spec import JOB_OF_METHOD, ExperimentError, load_experiment


def table1_commands(entry) -> list[list[str]]:
    """The megatron-reft command lines that produce a Table 1 entry's run directory."""
    if entry.commands:
        return entry.commands
    if entry.config:
        return [[JOB_OF_METHOD[entry.method], "--config", entry.config,
                 f"trainer.output_dir={entry.run_dir}", *entry.overrides]]
    return []


def resolve_checkpoint(path: str) -> str:
    """A run directory or checkpoints/ directory means its latest checkpoint (as the sbatch
    scripts' reft_resolve_checkpoint): the step an RM or PPO run ends at is rarely known upfront."""
    for pointer in (Path(path) / "checkpoints" / "latest", Path(path) / "latest"):
        if pointer.is_file():
            return str(pointer.parent / pointer.read_text().strip())
    return path


def table2_commands(entry) -> list[list[str]]:
    """The eval --samples command line(s) whose JSON line is the entry's eval_json."""
    if entry.commands:
        return entry.commands
    if not entry.config:
        return []
    predictions = str(Path(entry.eval_json).with_suffix("")) + ".predictions.jsonl"
    command = ["eval", "--config", entry.config, "--ckpt", resolve_checkpoint(entry.ckpt),
               "--samples", str(entry.samples), "--temperature", str(entry.temperature), "--out", predictions]
    if entry.reranker:
        command += ["--reranker", resolve_checkpoint(entry.reranker)]
    return [command + list(entry.overrides)]


def check_runnable(experiment) -> None:
    """Before anything runs: the recipes the derived commands name exist."""
    for table, entries in (("table1", experiment.table1), ("table2", experiment.table2)):
        for i, e in enumerate(entries):
            if e.config and not Path(e.config).is_file():
                raise ExperimentError(f"{experiment.path}: {table}[{i}].config: no such file: {e.config}")


def _launch(experiment, argv: list[str], stdout) -> int:
    prefix = experiment.launcher or [sys.executable]
    command = [*prefix, "-m", "megatron_reft.cli", *argv]
    print(f"experiment: running {' '.join(command)}", file=sys.stderr, flush=True)
    return subprocess.run(command, stdout=stdout).returncode


def run_missing(experiment) -> list[str]:
    """Run the commands of every entry whose number is missing; returns the failures (one line each)."""
    failures = []
    for i, entry in enumerate(experiment.table1):
        if collect.table1_cell(entry)["value"] is None:
            for argv in table1_commands(entry):
                rc = _launch(experiment, argv, None)
                if rc != 0:
                    failures.append(f"table1[{i}]: `megatron-reft {' '.join(argv)}` exited with {rc}")
                    break
    for i, entry in enumerate(experiment.table2):
        if collect.read_eval_line(entry.eval_json) is None:
            Path(entry.eval_json).parent.mkdir(parents=True, exist_ok=True)
            with open(entry.eval_json, "a") as out:  # the eval JSON line lands here
                for argv in table2_commands(entry):
                    rc = _launch(experiment, argv, out)
                    if rc != 0:
                        failures.append(f"table2[{i}]: `megatron-reft {' '.join(argv)}` exited with {rc}")
                        break
    return failures


def build_result(experiment) -> dict:
    out_dir = Path(experiment.output_dir)
    result = {"experiment": experiment.path, "table1": tables.build_table1(experiment.table1),
              "table2": tables.build_table2(experiment.table2)}
    curves = tables.accuracy_curves(experiment.table1)
    result["plot"] = tables.plot_curves(curves, out_dir / "accuracy_over_epochs.png")
    result["curves"] = curves
    return result


def write_outputs(result: dict, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = tables.markdown(result)
    (out_dir / "tables.md").write_text(text)
    (out_dir / "tables.json").write_text(json.dumps(result, indent=1) + "\n")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-reft experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment config (docs/experiment.md)")
    parser.add_argument("--run", action="store_true",
                        help="first run the jobs of entries whose numbers are missing (config or commands)")
    args = parser.parse_args(argv)
    try:
        experiment = load_experiment(args.config)
        if args.run:
            check_runnable(experiment)
    except ExperimentError as err:
        print(f"megatron-reft experiment: {err}", file=sys.stderr)
        return 2
    failures = run_missing(experiment) if args.run else []
    result = build_result(experiment)
    result["failures"] = failures
    print(write_outputs(result, Path(experiment.output_dir)), end="")
    for line in failures:
        print(f"megatron-reft experiment: {line}", file=sys.stderr)
    return 1 if failures else 0

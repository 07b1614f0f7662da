"""The experiment config: which run directory / eval output fills which cell of Tables 1 and 2.

    output_dir: runs/experiment            # tables.md, tables.json, accuracy_over_epochs.png
    launcher: [torchrun, --nproc-per-node=8]   # optional, for --run (default: this Python)
    table1:                                # greedy accuracy (reft.md §8's layout)
      - {model: CodeLlama-7B, method: sft, dataset: gsm8k, cot: pcot,
         run_dir: runs/sft, config: configs/codellama-7b_gsm8k_pcot_sft-best.yaml}
    table2:                                # voting@k / reranking@k (reft.md §6)
      - {model: CodeLlama-7B, method: reft, dataset: gsm8k, cot: pcot, eval_json: runs/eval/reft.jsonl,
         config: configs/codellama-7b_gsm8k_pcot_ppo.yaml, ckpt: runs/ppo/checkpoints/best,
         samples: 100, reranker: runs/rm/checkpoints/step_N}

Paths are relative to the working directory, as in the recipes. Every problem is one line naming
the file and the key (`table1[2].method: ...`); nothing is written or run before the whole file
has been checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

METHODS = ("sft", "offline-st", "online-st", "reft")  # Table 1's row order (reft.md §6, §8)
TABLE2_METHODS = ("sft", "reft")
COTS = ("ncot", "pcot")
SELECT = ("best", "last")
# the job that trains each method's run directory (offline-st: an SFT on offline-st-data's file)
JOB_OF_METHOD = {"sft": "sft", "offline-st": "sft", "online-st": "online-st", "reft": "ppo"}


class ExperimentError(ValueError):
    """One line: file, key, problem."""


@dataclass
class Table1Entry:
    model: str
    method: str
    dataset: str
    cot: str
    run_dir: str | None = None  # metrics.jsonl with eval_accuracy per evaluation
    eval_json: str | None = None  # or: a file holding `megatron-reft eval`'s JSON line
    select: str = "best"  # best: the best evaluation (the paper's "best epoch"); last: the final one
    config: str | None = None  # --run: `megatron-reft <job> --config CONFIG trainer.output_dir=RUN_DIR`
    overrides: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)  # --run: explicit megatron-reft commands


@dataclass
class Table2Entry:
    model: str
    method: str
    dataset: str
    cot: str
    eval_json: str  # the JSON line of `megatron-reft eval --samples K [--reranker CKPT]`
    config: str | None = None  # --run: eval --config CONFIG --ckpt CKPT --samples K [--reranker R]
    ckpt: str | None = None
    samples: int = 100
    temperature: float = 1.0
    reranker: str | None = None
    overrides: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)


@dataclass
class Experiment:
    output_dir: str
    table1: list[Table1Entry] = field(default_factory=list)
    table2: list[Table2Entry] = field(default_factory=list)
    launcher: list[str] = field(default_factory=list)
    path: str = ""


def _fields(cls) -> dict:
    return {name: f for name, f in cls.__dataclass_fields__.items()}


def _check_type(where: str, value, expected: str) -> None:
    ok = {"str": isinstance(value, str) and value != "",
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
          "list[list[str]]": isinstance(value, list) and all(
              isinstance(c, list) and c and all(isinstance(v, str) for v in c) for c in value)}[expected]
    if not ok:
        desc = {"str": "a non-empty string", "int": "an integer", "float": "a number",
                "list[str]": "a list of strings", "list[list[str]]": "a list of command lines (lists of strings)"}
        raise ExperimentError(f"{where}: expected {desc[expected]}, got {value!r}")


def _type_name(annotation: str) -> str:
    return annotation.replace(" | None", "")


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where}: expected a mapping of keys, got {raw!r}")
    fields = _fields(cls)
    unknown = sorted(set(raw) - (set(fields) - {"path"}))  # path: where the file was read, not a key
    if unknown:
        known = ", ".join(k for k in fields if k != "path")
        raise ExperimentError(f"{where}.{unknown[0]}: unknown key (known: {known})")
    from dataclasses import MISSING

    for name, f in fields.items():
        if name == "path":
            continue
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ExperimentError(f"{where}.{name}: missing (required)")
            continue
        if raw[name] is None and "None" in str(f.type):
            continue
        _check_type(f"{where}.{name}", raw[name], _type_name(str(f.type)))
    return cls(**{k: v for k, v in raw.items() if not (v is None and k in fields)})


def _check_choice(where: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ExperimentError(f"{where}: {value!r} is not one of {', '.join(choices)}")


def _check_table1(entry: Table1Entry, where: str) -> None:
    _check_choice(f"{where}.method", entry.method, METHODS)
    _check_choice(f"{where}.cot", entry.cot, COTS)
    _check_choice(f"{where}.select", entry.select, SELECT)
    if not entry.run_dir and not entry.eval_json:
        raise ExperimentError(f"{where}: needs run_dir (metrics.jsonl) or eval_json (an eval JSON line)")
    if entry.config and entry.commands:
        raise ExperimentError(f"{where}.commands: give config or commands, not both")
    if entry.config and not entry.run_dir:
        raise ExperimentError(f"{where}.run_dir: config needs the run directory it trains into")
    if entry.config and entry.eval_json:  # the derived job writes run_dir's metrics, not an eval line
        raise ExperimentError(f"{where}.eval_json: config trains run_dir; to fill eval_json, give commands")


def _check_table2(entry: Table2Entry, where: str) -> None:
    _check_choice(f"{where}.method", entry.method, TABLE2_METHODS)
    _check_choice(f"{where}.cot", entry.cot, COTS)
    if entry.samples < 1:
        raise ExperimentError(f"{where}.samples: must be >= 1, got {entry.samples}")
    if entry.config and entry.commands:
        raise ExperimentError(f"{where}.commands: give config or commands, not both")
    if entry.config and not entry.ckpt:
        raise ExperimentError(f"{where}.ckpt: config needs the checkpoint to evaluate")


def _check_unique(entries: list, table: str) -> None:
    seen = {}
    for i, e in enumerate(entries):
        key = (e.model, e.method, e.dataset, e.cot)
        if key in seen:
            raise ExperimentError(f"{table}[{i}]: same model/method/dataset/cot as {table}[{seen[key]}] "
                                  f"({'/'.join(key)})")
        seen[key] = i


def parse_experiment(raw, path: str) -> Experiment:
    """The typed experiment; ExperimentError names `path` and the key on the first problem."""
    try:
        if not isinstance(raw, dict):
            raise ExperimentError(f"expected a mapping with output_dir, table1, table2; got {type(raw).__name__}")
        top = dict(raw)
        tables = {name: top.pop(name, None) or [] for name in ("table1", "table2")}
        for name, value in tables.items():
            if not isinstance(value, list):
                raise ExperimentError(f"{name}: expected a list of entries, got {value!r}")
        experiment = _build(Experiment, top, "experiment")
        experiment.table1 = [_build(Table1Entry, e, f"table1[{i}]") for i, e in enumerate(tables["table1"])]
        experiment.table2 = [_build(Table2Entry, e, f"table2[{i}]") for i, e in enumerate(tables["table2"])]
        if not experiment.table1 and not experiment.table2:
            raise ExperimentError("table1, table2: both empty, nothing to tabulate")
        for i, e in enumerate(experiment.table1):
            _check_table1(e, f"table1[{i}]")
        for i, e in enumerate(experiment.table2):
            _check_table2(e, f"table2[{i}]")
        _check_unique(experiment.table1, "table1")
        _check_unique(experiment.table2, "table2")
    except ExperimentError as err:
        raise ExperimentError(f"{path}: {str(err).removeprefix('experiment.')}") from None
    experiment.path = path
    return experiment


def load_experiment(path: str) -> Experiment:
    file = Path(path)
    if not file.is_file():
        raise ExperimentError(f"{path}: no such experiment config")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise ExperimentError(f"{path}: not valid YAML{at}: {getattr(err, 'problem', err)}") from None
    return parse_experiment(raw, path)

"""`megatron-reft data check|prepare`: the paper recipes' data files (configs/*.yaml name them under
data/). Where each comes from is in docs/data.md, "The paper's data files".

    megatron-reft data check   [--dir data]                       counts (reft.md §7) and schema
    megatron-reft data prepare [--dir data] [--mwp-reft DIR] [--gsm8k DIR]

`prepare` copies the ReFT authors' released files from a local copy of their repository's data/
folder (github.com/lqtrung1998/mwp_ReFT) and builds data/gsm8k_nl.json from OpenAI's GSM8K
train.jsonl; it never overwrites a file and never touches the network.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

# reft.md §7: train N-CoT / P-CoT / test sizes of the authors' files.
EXPECTED = {
    "gsm8k_nl.json": 7465, "gsm8k_python_sdp.json": 7356, "gsm8k_test_set.json": 1319,
    "svamp_nl.json": 3076, "svamp_python_sdp.json": 3043, "svamp_test_set.json": 1000,
    "mathqa_nl.json": 14862, "mathqa_python_sdp.json": 15250, "mathqa_test_set.json": 1605,
    "mathqa-numeric_nl.json": 8955, "mathqa-numeric_test_set.json": 1605,
}
# Released in the authors' repository (data/); the other training files were not published.
RELEASED = ("svamp_nl.json", "svamp_python_sdp.json", "gsm8k_test_set.json", "svamp_test_set.json",
            "mathqa_test_set.json", "mathqa-numeric_test_set.json")
GSM8K_BUILT = "gsm8k_nl.json"  # from OpenAI's train.jsonl: 7,473 items (the authors kept 7,465)


@dataclass
class FileStatus:
    name: str
    count: int | None  # None: missing
    malformed: int = 0
    problem: str | None = None

    @property
    def line(self) -> str:
        expected = EXPECTED[self.name]
        if self.count is None:
            return f"{self.name:<30} missing       (paper: {expected}) {self.problem or ''}".rstrip()
        note = "ok" if self.count == expected else f"differs from the paper's {expected}"
        bad = f", {self.malformed} malformed" if self.malformed else ""
        return f"{self.name:<30} {self.count:>6} items{bad}  {note}"


def recipe_files(configs_dir: Path) -> set[str]:
    """File names under data/ that the recipes in configs/ train or evaluate on."""
    import yaml

    names = set()
    for recipe in configs_dir.glob("*.yaml"):
        data = (yaml.safe_load(recipe.read_text()) or {}).get("data") or {}
        for key in ("train_file", "eval_file"):
            value = data.get(key)
            if isinstance(value, str) and value.startswith("data/"):
                names.add(value[len("data/"):])
    return names


def check_file(path: Path) -> FileStatus:
    """Count and validate one file with the loader the jobs use (schema, answers, CoT type)."""
    from megatron_reft.data import load_records

    name = path.name
    if not path.is_file():
        return FileStatus(name, None, problem=_where(name))
    is_test = name.endswith("_test_set.json")
    cot_type = "pcot" if "python_sdp" in name else "ncot"
    try:
        records, report = load_records(str(path), cot_type, "mwp_reft", "report", require_cot=not is_test)
    except (ValueError, json.JSONDecodeError) as err:
        return FileStatus(name, 0, problem=str(err).splitlines()[0])
    malformed = sum(report.malformed.values())
    return FileStatus(name, len(records), malformed)


def _where(name: str) -> str:
    if name in RELEASED:
        return "<- `data prepare --mwp-reft <clone of lqtrung1998/mwp_ReFT>/data`"
    if name == GSM8K_BUILT:
        return "<- `data prepare --gsm8k <dir with OpenAI's GSM8K train.jsonl>`"
    return "<- not published: ask the ReFT authors (see docs/data.md)"


def check(data_dir: Path, names: list[str]) -> int:
    statuses = [check_file(data_dir / n) for n in names]
    for status in statuses:
        print(status.line)
    failed = [s for s in statuses if s.count is None or s.problem or s.malformed]
    print(f"{len(statuses) - len(failed)}/{len(statuses)} files present and well-formed in {data_dir}")
    return 1 if failed else 0


def prepare(data_dir: Path, mwp_reft: Path | None, gsm8k: Path | None) -> list[str]:
    """Copy released files and build gsm8k_nl.json; returns what was written."""
    written = []
    data_dir.mkdir(parents=True, exist_ok=True)
    if mwp_reft is not None:
        for name in RELEASED:
            if (mwp_reft / name).is_file() and not (data_dir / name).exists():
                shutil.copyfile(mwp_reft / name, data_dir / name)
                written.append(name)
    if gsm8k is not None and not (data_dir / GSM8K_BUILT).exists():
        _build_gsm8k_nl(gsm8k / "train.jsonl", data_dir / GSM8K_BUILT)
        written.append(GSM8K_BUILT)
    return written


def _build_gsm8k_nl(train_jsonl: Path, out: Path) -> None:
    """OpenAI GSM8K {question, answer} -> the authors' schema: calculator marks removed, the
    '#### 72' line becomes answer_value (the N-CoT ending is added by the prompt code)."""
    from megatron_reft.data import load_records

    records, _ = load_records(str(train_jsonl), "ncot", "gsm8k", "raise")
    rows = [{"item_id": f"gsm8k_{i}", "question": r.question, "answer_cot": r.cot, "answer_value": r.answer}
            for i, r in enumerate(records)]
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-reft data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("check", "prepare"):
        p = sub.add_parser(name)
        p.add_argument("--dir", default="data", help="where the recipes look (data/ next to configs/)")
        p.add_argument("--configs", default="configs", help="recipes whose data files to check")
        if name == "prepare":
            p.add_argument("--mwp-reft", help="local copy of the ReFT repository's data/ folder")
            p.add_argument("--gsm8k", help="folder with OpenAI's GSM8K train.jsonl")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for option in ("mwp_reft", "gsm8k"):
        value = getattr(args, option, None)
        if value is not None and not Path(value).is_dir():
            print(f"megatron-reft data: --{option.replace('_', '-')}: not a directory: {value}", file=sys.stderr)
            return 2
    names = sorted(recipe_files(Path(args.configs))) or sorted(EXPECTED)
    names = [n for n in names if n in EXPECTED]
    if args.command == "prepare":
        written = prepare(Path(args.dir), _path(args.mwp_reft), _path(args.gsm8k))
        print(f"wrote {', '.join(written) if written else 'nothing new'} in {args.dir}")
    return check(Path(args.dir), names)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None

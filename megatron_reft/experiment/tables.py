"""Tables 1 and 2 in the paper's layout (reft.md §8), as markdown and JSON, and the plot of
held-out accuracy over epochs per method.

Table 1: one row per model and method (SFT, Offline Self-Training, Online Self-Training, ReFT),
columns GSM8K / SVAMP / MathQA-MCQ × N-CoT / P-CoT (then any other dataset of the experiment),
value accuracy in %. Table 2: "SFT + Voting@k", "ReFT + Voting@k", "SFT + Reranking@k",
"ReFT + Reranking@k" over the dataset/CoT columns the experiment evaluated with samples.
"""
from __future__ import annotations

from megatron_reft.experiment.collect import accuracy_curve, missing, read_metrics, table1_cell, table2_cells
from megatron_reft.experiment.spec import METHODS, TABLE2_METHODS

DATASET_LABELS = {"gsm8k": "GSM8K", "svamp": "SVAMP", "mathqa": "MathQA-MCQ", "mathqa-numeric": "MathQA-numeric"}
PAPER_COLUMNS = [(d, c) for d in ("gsm8k", "svamp", "mathqa") for c in ("ncot", "pcot")]
METHOD_LABELS = {"sft": "SFT", "offline-st": "Offline Self-Training", "online-st": "Online Self-Training",
                 "reft": "ReFT"}
NOT_CONFIGURED = "not in the experiment config"
DASH = "–"


def column_key(dataset: str, cot: str) -> str:
    return f"{dataset}/{cot}"


def column_label(dataset: str, cot: str) -> str:
    return f"{DATASET_LABELS.get(dataset, dataset)} {'N' if cot == 'ncot' else 'P'}"


def _columns(entries: list, paper_columns: list) -> list[tuple[str, str]]:
    """The paper's columns first, then the experiment's others in canonical dataset order, N before P."""
    extra = {(e.dataset, e.cot) for e in entries} - set(paper_columns)
    order = list(DATASET_LABELS)
    return paper_columns + sorted(extra, key=lambda dc: (order.index(dc[0]) if dc[0] in order else len(order),
                                                         dc[0], dc[1]))


def _models(entries: list) -> list[str]:
    return list(dict.fromkeys(e.model for e in entries))


def build_table1(entries: list) -> dict:
    columns = _columns(entries, PAPER_COLUMNS if entries else [])
    by_key = {(e.model, e.method, e.dataset, e.cot): e for e in entries}
    rows = []
    for model in _models(entries):
        for method in [m for m in METHODS if any(e.model == model and e.method == m for e in entries)]:
            cells = {}
            for dataset, cot in columns:
                entry = by_key.get((model, method, dataset, cot))
                cells[column_key(dataset, cot)] = table1_cell(entry) if entry else missing(NOT_CONFIGURED)
            rows.append({"label": f"{model} {METHOD_LABELS[method]}", "model": model, "method": method,
                         "cells": cells})
    return {"columns": _column_dicts(columns), "rows": rows}


def _column_dicts(columns: list[tuple[str, str]]) -> list[dict]:
    return [{"key": column_key(d, c), "dataset": d, "cot": c, "label": column_label(d, c)} for d, c in columns]


def _k_label(cells: dict, entries: list) -> str:
    """'@100' from the eval lines' k (or the configured samples); '@k' when they differ."""
    ks = {c["k"] for c in cells.values() if c.get("k") is not None} or {e.samples for e in entries}
    return f"@{ks.pop()}" if len(ks) == 1 else "@k"


def build_table2(entries: list) -> dict:
    columns = _columns(entries, [])
    collected = {(e.model, e.method, e.dataset, e.cot): (e, table2_cells(e)) for e in entries}
    rows = []
    for model in _models(entries):
        for kind, kind_label in (("voting", "Voting"), ("reranking", "Reranking")):
            for method in [m for m in TABLE2_METHODS if any(e.model == model and e.method == m for e in entries)]:
                cells, used = {}, []
                for dataset, cot in columns:
                    found = collected.get((model, method, dataset, cot))
                    cells[column_key(dataset, cot)] = found[1][kind] if found else missing(NOT_CONFIGURED)
                    used += [found[0]] if found else []
                label = f"{model} {METHOD_LABELS[method]} + {kind_label}{_k_label(cells, used)}"
                rows.append({"label": label, "model": model, "method": method, "kind": kind, "cells": cells})
    return {"columns": _column_dicts(columns), "rows": rows}


def format_cell(cell: dict) -> str:
    return DASH if cell.get("value") is None else f"{100 * cell['value']:.2f}"


def markdown_table(table: dict) -> list[str]:
    if not table["rows"]:
        return ["(no entries)"]
    lines = ["| | " + " | ".join(c["label"] for c in table["columns"]) + " |",
             "|---|" + "---|" * len(table["columns"])]
    for row in table["rows"]:
        lines.append(f"| {row['label']} | " + " | ".join(format_cell(row["cells"][c["key"]])
                                                           for c in table["columns"]) + " |")
    return lines


def markdown(result: dict) -> str:
    lines = ["# Experiment tables", "", f"From `{result['experiment']}` (value accuracy %, reft.md §8's layout; "
             f"{DASH} = no number, the reason is in tables.json).", "",
             "## Table 1: greedy accuracy", ""]
    lines += markdown_table(result["table1"])
    lines += ["", "## Table 2: majority voting and reward-model reranking", ""]
    lines += markdown_table(result["table2"])
    lines += ["", "## Held-out accuracy over epochs", ""]
    plot = result["plot"]
    lines += [f"![accuracy over epochs]({plot['file']})" if plot.get("file") else f"(no plot: {plot['note']})"]
    return "\n".join(lines) + "\n"


def accuracy_curves(entries: list) -> dict:
    """{"gsm8k/pcot": {"CodeLlama-7B SFT": [{step, epoch, accuracy}, ...]}} from the run directories."""
    curves: dict = {}
    for e in entries:
        rows = read_metrics(e.run_dir) if e.run_dir else None
        points = accuracy_curve(rows) if rows else []
        if points:
            curves.setdefault(column_key(e.dataset, e.cot), {})[f"{e.model} {METHOD_LABELS[e.method]}"] = points
    return curves


def plot_curves(curves: dict, out_png) -> dict:
    """One panel per dataset/CoT, one line per method; {"file": name} or {"note": why not}."""
    if not curves:
        return {"note": "no run directory has logged eval_accuracy"}
    try:
        import matplotlib  # optional: pip install 'megatron-reft[plots]'
    except ImportError:
        return {"note": "matplotlib is not installed (pip install 'megatron-reft[plots]')"}
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.8 * len(curves), 3.4), squeeze=False)
    for ax, (key, lines) in zip(axes.flat, curves.items()):
        for label, points in lines.items():
            ax.plot([p["epoch"] for p in points], [100 * p["accuracy"] for p in points], marker=".", label=label)
        dataset, cot = key.split("/")
        ax.set_title(column_label(dataset, cot) + "-CoT", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return {"file": out_png.name}

"""Reports of self-adaptation runs in the paper's shapes (spec sections 4.2, 5 and 5.1):
Table 2 (accuracy per method and task, normalized by the base model), Table 3 (wall time of the two
passes), Fig. 6 (dispatch confusion matrices: rows = true task category, columns = predicted) and
Fig. 7 (the learned alpha per expert; per-matrix alpha is averaged over matrices, as the official
code logs it), and the answers of several runs to the same items side by side.

    table = table2({"base": {"math": summary, ...}, "prompt": {...}}, model="smollm2-135m-instruct")
    write_table2(table, "runs/table2")                  # table2.md + table2.json
    plot_confusions({"base": counts, "cls-expert": counts}, "runs/table2/confusion.png")
    plot_alpha({"math": alpha, ...}, ("math", "code", "reasoning"), "runs/table2/alpha.png")
    print(item_comparison({"base": base_records, "prompt": records}))  # answers side by side
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no backend or global state needed

from t2jax.tasks.cls import CATEGORIES, OTHER

TABLE2_TASKS = ("math", "humaneval", "arc_challenge")
TASK_TITLES = {"math": "MATH", "humaneval": "HumanEval", "arc_challenge": "ARC-Challenge"}
METHODS = ("base", "prompt", "cls", "fewshot")
METHOD_TITLES = {
    "base": "base",
    "prompt": "+ T² (Prompt)",
    "cls": "+ T² (Cls-expert)",
    "fewshot": "+ T² (Few-shot)",
}
PREDICTED = (*CATEGORIES, OTHER)  # confusion-matrix columns


def table2(results: Mapping[str, Mapping[str, Mapping[str, Any]]], model: str) -> dict[str, Any]:
    """The Table 2 structure from run summaries.

    Args:
        results: method ("base", "prompt", "cls", "fewshot") -> task -> a summary with
            `accuracy`, `n` and optionally `standard_error` (as `adaptation.pipeline.score_run` or
            `evaluation.evaluate` return) and `vs_base` (`evaluation.paired_comparison` against
            the base run on the same items).
        model: the model's name, shown in the base row.

    Returns:
        {"model", "tasks", "rows": [{"method", "title", "cells": {task: {"accuracy", "n",
        "standard_error", "normalized", "difference", "difference_standard_error"}}}]};
        "normalized" is accuracy / the base accuracy (absent without a base run or when the base
        scored 0); "difference" (method - base) and its paired standard error are present where
        the summary has `vs_base`.
    """
    base = results.get("base", {})
    rows = []
    for method in (m for m in METHODS if m in results):
        cells = {}
        for task, summary in results[method].items():
            cell = {
                "accuracy": summary["accuracy"],
                "n": summary["n"],
                "standard_error": summary.get("standard_error"),
            }
            if task in base and base[task]["accuracy"] > 0:
                cell["normalized"] = summary["accuracy"] / base[task]["accuracy"]
            if summary.get("vs_base"):
                cell["difference"] = summary["vs_base"]["difference"]
                cell["difference_standard_error"] = summary["vs_base"]["difference_standard_error"]
            cells[task] = cell
        title = model if method == "base" else METHOD_TITLES[method]
        rows.append({"method": method, "title": title, "cells": cells})
    tasks = [t for t in TABLE2_TASKS if any(t in row["cells"] for row in rows)]
    tasks += sorted({t for row in rows for t in row["cells"]} - set(tasks))
    return {"model": model, "tasks": tasks, "rows": rows}


def table2_markdown(table: Mapping[str, Any]) -> str:
    """Markdown of `table2`: accuracy in percent with the normalized score in parentheses, as in
    the paper, and where known the paired difference from base in points ± its standard error;
    then a row with the number of items per task."""
    tasks = table["tasks"]
    lines = [
        "| model | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for row in table["rows"]:
        cells = [_table2_cell(row["cells"].get(task)) for task in tasks]
        lines.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    counts = [
        "/".join(sorted({str(row["cells"][t]["n"]) for row in table["rows"] if t in row["cells"]}))
        for t in tasks
    ]
    lines.append("| n | " + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n"


def _table2_cell(cell: Mapping[str, Any] | None) -> str:
    if cell is None:
        return "–"
    text = f"{100 * cell['accuracy']:.2f}"
    if "normalized" in cell:
        text += f" ({cell['normalized']:.2f})"
    if "difference" in cell:
        text += f", {100 * cell['difference']:+.1f} ± {100 * cell['difference_standard_error']:.1f}"
    return text


def write_table2(table: Mapping[str, Any], out_dir: str | os.PathLike) -> pathlib.Path:
    """Writes `table2.md` and `table2.json` into `out_dir` (created); returns the markdown path."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table2.json").write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n")
    markdown = out / "table2.md"
    markdown.write_text(table2_markdown(table))
    return markdown


def timing_markdown(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Table 3: task -> summary with `first_pass_seconds` and `second_pass_seconds`; the ratio is
    first / second, as in the paper."""
    lines = ["| task | 1st pass (s) | 2nd pass (s) | ratio |", "|---|---:|---:|---:|"]
    for task, summary in rows.items():
        first, second = summary["first_pass_seconds"], summary["second_pass_seconds"]
        ratio = f"{100 * first / second:.0f}%" if second > 0 else "–"
        lines.append(f"| {TASK_TITLES.get(task, task)} | {first:.2f} | {second:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def run_markdown(summary: Mapping[str, Any]) -> str:
    """A one-row table of an `adaptation.pipeline.score_run` summary: accuracy (when scored), pass
    times and where the requests were routed."""
    accuracy = "–"
    if "accuracy" in summary:
        accuracy = f"{100 * summary['accuracy']:.2f} ± {100 * summary['standard_error']:.2f}"
    routes = ", ".join(f"{name}: {count}" for name, count in summary["routes"].items())
    return (
        "| strategy | task | n | accuracy (%) | 1st pass (s) | 2nd pass (s) | routes |\n"
        "|---|---|---:|---:|---:|---:|---|\n"
        f"| {summary['strategy']} | {summary.get('task', '–')} | {summary['n']} | {accuracy} | "
        f"{summary['first_pass_seconds']:.2f} | {summary['second_pass_seconds']:.2f} | {routes} |\n"
    )


def item_comparison(columns: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown, one row per item: the gold answer, then per column (e.g. "base", "prompt") the
    extracted answer marked right or wrong, with the weights that answered it in parentheses when
    the column's records carry routes (`adaptation.pipeline.score_run`; None: the base weights);
    a last row gives each column's accuracy.

    Args:
        columns: title -> scored records (`evaluation.sample_record`) of the same items in the
            same order.

    Raises:
        ValueError: columns over different items.
    """
    first = next(iter(columns.values()))
    ids = [record["id"] for record in first]
    if any([record["id"] for record in records] != ids for records in columns.values()):
        raise ValueError("every column must hold the same items in the same order")
    routed = {title: any(r.get("route") for r in records) for title, records in columns.items()}
    lines = [
        "| item | gold | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for i, item in enumerate(ids):
        cells = []
        for title, records in columns.items():
            record = records[i]
            cell = f"{_cell_text(record['extracted'])} {'✓' if record['correct'] else '✗'}"
            cells.append(f"{cell} ({record['route'] or 'base'})" if routed[title] else cell)
        lines.append(f"| {item} | {_cell_text(first[i]['gold'])} | " + " | ".join(cells) + " |")
    totals = []
    for records in columns.values():
        correct = sum(bool(record["correct"]) for record in records)
        totals.append(f"{correct}/{len(records)} ({100 * correct / max(len(records), 1):.1f}%)")
    lines.append("| accuracy | | " + " | ".join(totals) + " |")
    return "\n".join(lines) + "\n"


def _cell_text(value: Any, width: int = 24) -> str:
    """`value` on one line, at most `width` characters, safe inside a markdown cell ("–": None)."""
    if value is None:
        return "–"
    text = " ".join(str(value).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def confusion_counts(true_categories: Sequence[str], predicted: Sequence[str]) -> np.ndarray:
    """Counts [3, 4]: rows = true category (code, math, reasoning), columns = predicted
    (code, math, reasoning, other).

    Raises:
        ValueError: a true category outside code/math/reasoning or a prediction outside the
            four columns.
    """
    counts = np.zeros((len(CATEGORIES), len(PREDICTED)), np.int64)
    for truth, guess in zip(true_categories, predicted, strict=True):
        if truth not in CATEGORIES or guess not in PREDICTED:
            raise ValueError(f"cannot count true {truth!r} / predicted {guess!r}")
        counts[CATEGORIES.index(truth), PREDICTED.index(guess)] += 1
    return counts


def plot_confusions(matrices: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Fig. 6: one row-normalized confusion matrix per dispatcher (e.g. base and cls expert), with
    the "other" column shown (the paper omits it, so its rows may not sum to 1)."""
    figure = Figure(figsize=(4.2 * len(matrices), 3.6))
    axes = figure.subplots(1, len(matrices), squeeze=False)
    for axis, (title, counts) in zip(axes[0], matrices.items(), strict=True):
        totals = counts.sum(axis=1, keepdims=True)
        rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        axis.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
        for (row, column), rate in np.ndenumerate(rates):
            color = "white" if rate > 0.5 else "black"
            axis.text(column, row, f"{rate:.2f}", ha="center", va="center", color=color)
        axis.set_xticks(range(len(PREDICTED)), PREDICTED)
        rows = [f"{c} ({n})" for c, n in zip(CATEGORIES, totals[:, 0], strict=True)]
        axis.set_yticks(range(len(CATEGORIES)), rows)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true task category (n)")
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def alpha_per_expert(alpha: Any) -> np.ndarray:
    """[K]: alpha itself, or per-matrix alpha [K, M] averaged over matrices."""
    alpha = np.asarray(alpha, np.float64)
    return alpha if alpha.ndim == 1 else alpha.mean(axis=1)


def plot_alpha(alphas: Mapping[str, Any], experts: Sequence[str], path: str | os.PathLike) -> None:
    """Fig. 7: the learned alpha_k per expert (grouped bars), one group per task."""
    figure = Figure(figsize=(1.6 + 1.4 * len(alphas) * len(experts) / 3, 3.4))
    axis = figure.subplots()
    width = 0.8 / len(experts)
    for k, expert in enumerate(experts):
        values = [alpha_per_expert(alpha)[k] for alpha in alphas.values()]
        positions = np.arange(len(alphas)) + (k - (len(experts) - 1) / 2) * width
        axis.bar(positions, values, width, label=expert)
    axis.set_xticks(range(len(alphas)), [TASK_TITLES.get(t, t) for t in alphas])
    axis.set_ylabel("alpha (mean over matrices)")
    axis.legend(title="expert")
    figure.tight_layout()
    figure.savefig(path, dpi=120)

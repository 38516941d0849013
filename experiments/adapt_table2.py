"""The paper's Table 2 on subsets: base / prompt / cls-expert / few-shot on MATH, HumanEval and
ARC-Challenge, with Table 3 (pass timings of the prompt strategy), the dispatch confusion
matrices (Fig. 6) and the learned alpha (Fig. 7). All logic is in `t2jax.adaptation` and
`t2jax.reports`.

Every method answers the same items of each test split: the first --limit of those left after
the official few-shot shots (seeds 27 / 16 / 38), the items the few-shot strategy reports on.
Each cell is written to OUT/METHOD/TASK (samples.jsonl, summary.json) as soon as it finishes; a
rerun with the same --out reuses finished cells (--restart recomputes them), and the tables and
plots are built from those files (--report-only rebuilds them from whatever cells are done).
Each strategy's cell also gives its paired difference from the base cell (same items).
--records FILE keeps every finished cell in one small JSON file (no benchmark content) and seeds
the missing cells of --out from it, so a new machine resumes from the committed file.

    nice -n 19 python experiments/adapt_table2.py --model qwen2.5-coder-0.5b-instruct \\
        --experts builtin --cls-expert builtin --prompt-dispatch calibrated --limit 100 \\
        --out runs/table2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from t2jax import evaluation, files, reports
from t2jax.adaptation import pipeline as adapt
from t2jax.adaptation.config import AdaptOptions, add_few_shot_arguments, few_shot_config
from t2jax.adaptation.dispatch import dispatch_confusion
from t2jax.adaptation.expert_model import (
    ExpertModel,
    build_expert_model,
    expert_paths,
    load_named_experts,
)
from t2jax.loading import load_model
from t2jax.tasks import get_task
from t2jax.tasks.cls import DISPATCH_METHODS
from t2jax.tasks.data import read_jsonl

DISPATCH_STRATEGIES = ("prompt", "cls")


def parse_args() -> argparse.Namespace:
    """The command line (the few-shot options are `t2jax adapt`'s)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument(
        "--experts", required=True, help="math=PATH,code=PATH,reasoning=PATH, or builtin"
    )
    parser.add_argument(
        "--cls-expert", default=None, help="needed for the cls method (a path, or builtin)"
    )
    for method in DISPATCH_STRATEGIES:
        parser.add_argument(
            f"--{method}-dispatch",
            choices=DISPATCH_METHODS,
            default="generate",
            help=f"how the {method} strategy reads the category (default: the official generate)",
        )
    parser.add_argument("--tasks", default=",".join(reports.TABLE2_TASKS))
    parser.add_argument("--methods", default=",".join(reports.METHODS))
    parser.add_argument("--limit", type=int, default=50, help="reported items per task")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    parser.add_argument("--classify-max-new-tokens", type=int, default=512)
    parser.add_argument("--rows-per-call", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None, help="SVD factor cache root")
    parser.add_argument("--out", default="runs/table2")
    parser.add_argument(
        "--records",
        default=None,
        help="a JSON file that also keeps every finished cell without prompts, outputs, "
        "answers or item names (ids hashed; small enough to commit, no benchmark content); "
        "cells kept there and missing from --out are written back into it and reused",
    )
    parser.add_argument("--restart", action="store_true", help="recompute finished cells")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rebuild the tables and plots from the finished cells; run nothing",
    )
    add_few_shot_arguments(parser.add_argument_group("few-shot CEM"))
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(reports.METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; use {', '.join(reports.METHODS)}")
    if "cls" in methods and args.cls_expert is None:
        parser.error("the cls method needs --cls-expert")
    return args


def read_cell(cell_dir: pathlib.Path) -> tuple[list[dict], dict]:
    """The records and summary a finished cell wrote (`adapt.write_run`)."""
    summary = json.loads((cell_dir / "summary.json").read_text())
    return read_jsonl(cell_dir / "samples.jsonl"), summary


def write_reports(
    out: pathlib.Path,
    model_name: str,
    expert_names: tuple[str, ...],
    records: dict[str, dict[str, list[dict]]],
    summaries: dict[str, dict[str, dict]],
) -> None:
    """Table 2 (md + json), Table 3, the confusion and alpha plots, from the cells' files."""
    table = reports.table2(summaries, model=model_name)
    print(reports.write_table2(table, out).read_text())
    if "prompt" in summaries:
        timing = reports.timing_markdown(summaries["prompt"])
        (out / "table3.md").write_text(timing)
        print(timing)
    confusions = {
        reports.METHOD_TITLES[method]: dispatch_confusion(
            {task: [r["category"] for r in rows] for task, rows in records[method].items()}
        )
        for method in DISPATCH_STRATEGIES
        if method in records
    }
    if confusions:
        reports.plot_confusions(confusions, out / "confusion.png")
    if "fewshot" in summaries:
        alphas = {task: summary["alpha"] for task, summary in summaries["fewshot"].items()}
        reports.plot_alpha(alphas, expert_names, out / "alpha.png")


# What a committed record keeps of a sample record: what the tables, the paired differences and
# the confusion matrices read, and nothing of the benchmark (no prompt, gold answer, reason or
# item name: the id is hashed by `evaluation.anonymous_id`).
COMPACT_FIELDS = ("route", "category", "classification", "correct", "reward")


def compact_record(record: dict) -> dict:
    """`record` reduced to its `evaluation.anonymous_id` and COMPACT_FIELDS, with `extracted`
    blanked to "" (None stays None): it keeps whether an answer was extracted
    (`evaluation.paired_difference` reads that) without the answer, which for code tasks repeats
    the benchmark's prompt. Compacting a compact record changes nothing."""
    compact = {name: record[name] for name in COMPACT_FIELDS if name in record}
    extracted = None if record.get("extracted") is None else ""
    return {"id": evaluation.anonymous_id(record["id"]), **compact, "extracted": extracted}


def compact_by_id(records: list[dict]) -> dict[str, dict]:
    """`compact_record` of each record, by anonymous id."""
    return {compact["id"]: compact for compact in map(compact_record, records)}


def read_stored_cells(records_file: pathlib.Path) -> dict[str, dict[str, dict]]:
    """The cells kept in a --records file: {method: {task: {"summary", "records"}}}."""
    return json.loads(records_file.read_text()) if records_file.exists() else {}


def store_compact_cell(
    records_file: pathlib.Path,
    cells: dict[str, dict[str, dict]],
    method: str,
    task: str,
    cell_records: list[dict],
    summary: dict,
) -> None:
    """Puts a finished cell (its summary and its records reduced by `compact_record`) into
    `cells`, the --records file's contents, and rewrites that file atomically if the cell is new
    or changed."""
    cell = {"summary": summary, "records": [compact_record(record) for record in cell_records]}
    if cells.get(method, {}).get(task) != cell:
        cells.setdefault(method, {})[task] = cell
        files.write_json_atomically(records_file, cells)


def run_cell(model, args, few_shot, task_name: str, method: str, cell_dir: pathlib.Path) -> None:
    """Runs one method on one task's reported items and writes the cell's files."""
    task = get_task(task_name)
    items = task.load("test", data_dir=args.data_dir)
    options = AdaptOptions(
        max_new_tokens=args.max_new_tokens,
        rows_per_call=args.rows_per_call,
        classify_max_new_tokens=args.classify_max_new_tokens,
        dispatch=getattr(args, f"{method}_dispatch", "generate"),
        few_shot=few_shot,
    )
    run = adapt.evaluate_method(
        model, method, task, items, options, limit=args.limit, progress=True
    )
    adapt.write_run(cell_dir, run, task)


def main() -> None:
    args = parse_args()
    few_shot = few_shot_config(args)
    out = pathlib.Path(args.out)
    records_file = pathlib.Path(args.records) if args.records else None
    stored_cells = read_stored_cells(records_file) if records_file else {}
    model = None  # loaded when the first cell has to run
    records: dict[str, dict[str, list[dict]]] = {}
    summaries: dict[str, dict[str, dict]] = {}
    for task_name in args.tasks.split(","):
        for method in args.methods.split(","):
            cell_dir = out / method / task_name
            finished = (cell_dir / "summary.json").exists()
            stored = stored_cells.get(method, {}).get(task_name)
            if stored and not finished and not args.restart:
                evaluation.write_run(
                    cell_dir, stored["records"], stored["summary"], reports.run_markdown
                )
                finished = True
            if args.report_only and not finished:
                print(f"{method} {task_name}: not run")
                continue
            if args.restart or not finished:
                print(f"{method} {task_name}: running {args.limit} items", flush=True)
                if model is None:
                    model = load_expert_model(args)
                    out.mkdir(parents=True, exist_ok=True)
                    options = {**vars(args), "few_shot": dataclasses.asdict(few_shot)}
                    (out / "options.json").write_text(json.dumps(options, indent=2) + "\n")
                run_cell(model, args, few_shot, task_name, method, cell_dir)
            cell_records, summary = read_cell(cell_dir)
            if records_file:  # the summary as written, before the vs-base pairing below
                store_compact_cell(
                    records_file, stored_cells, method, task_name, cell_records, dict(summary)
                )
            base_dir = out / "base" / task_name
            if method != "base" and (base_dir / "summary.json").exists():
                # Compacted, a cell run here pairs with a base cell seeded from --records.
                base_records, _ = read_cell(base_dir)
                summary["vs_base"] = evaluation.paired_difference(
                    compact_by_id(base_records), compact_by_id(cell_records)
                )
            records.setdefault(method, {})[task_name] = cell_records
            summaries.setdefault(method, {})[task_name] = summary
            print(f"{method} {task_name}: {summary['accuracy']:.4f} (n={summary['n']})")
    expert_names = tuple(expert_paths(args.model, args.experts))
    write_reports(out, args.model, expert_names, records, summaries)


def load_expert_model(args) -> ExpertModel:
    """The model with its experts (and the classifier, when given)."""
    experts, classifier = load_named_experts(args.model, args.experts, args.cls_expert)
    loaded = load_model(args.model)
    return build_expert_model(loaded, experts, classifier, cache_root=args.cache_dir)


if __name__ == "__main__":
    main()

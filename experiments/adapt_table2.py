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
import itertools
import json
import pathlib

from t2jax import evaluation, files, reports
from t2jax.adaptation import pipeline as adapt
from t2jax.adaptation.config import (
    AdaptOptions,
    FewShotConfig,
    add_few_shot_arguments,
    few_shot_config,
)
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


@dataclasses.dataclass
class Cells:
    """Where each cell's files come from: --out when finished there, else the --records file
    (written back into --out), else a run here; the model loads when the first cell has to run."""

    args: argparse.Namespace
    few_shot: FewShotConfig
    out: pathlib.Path
    records_file: pathlib.Path | None
    stored: dict[str, dict[str, dict]]  # the --records file: {method: {task: {summary, records}}}
    model: ExpertModel | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Cells:
        """The cells of the command line's --out and --records."""
        records_file = pathlib.Path(args.records) if args.records else None
        stored = (
            json.loads(records_file.read_text()) if records_file and records_file.exists() else {}
        )
        return cls(args, few_shot_config(args), pathlib.Path(args.out), records_file, stored)

    def directory(self, method: str, task: str) -> pathlib.Path:
        """OUT/METHOD/TASK: the cell's samples.jsonl and summary.json."""
        return self.out / method / task

    def restored(self, method: str, task: str) -> bool:
        """Whether the cell's files are in --out, after writing them there from --records when
        only kept there (not under --restart)."""
        cell_dir = self.directory(method, task)
        if (cell_dir / "summary.json").exists():
            return True
        kept = self.stored.get(method, {}).get(task)
        if kept is None or self.args.restart:
            return False
        evaluation.write_run(cell_dir, kept["records"], kept["summary"], reports.run_markdown)
        return True

    def run(self, method: str, task_name: str) -> None:
        """Runs one method on one task's reported items and writes the cell's files."""
        print(f"{method} {task_name}: running {self.args.limit} items", flush=True)
        if self.model is None:
            self.model = load_expert_model(self.args)
            self.out.mkdir(parents=True, exist_ok=True)
            settings = {**vars(self.args), "few_shot": dataclasses.asdict(self.few_shot)}
            files.write_json_atomically(self.out / "options.json", settings)
        task = get_task(task_name)
        options = AdaptOptions(
            max_new_tokens=self.args.max_new_tokens,
            rows_per_call=self.args.rows_per_call,
            classify_max_new_tokens=self.args.classify_max_new_tokens,
            dispatch=getattr(self.args, f"{method}_dispatch", "generate"),
            few_shot=self.few_shot,
        )
        items = task.load("test", data_dir=self.args.data_dir)
        run = adapt.evaluate_method(
            self.model, method, task, items, options, limit=self.args.limit, progress=True
        )
        adapt.write_run(self.directory(method, task_name), run, task)

    def keep(self, method: str, task: str, cell_records: list[dict], summary: dict) -> None:
        """Puts a finished cell (its summary and its records reduced by `compact_record`) into the
        --records file, rewritten atomically if the cell is new or changed."""
        if self.records_file is None:
            return
        cell = {"summary": summary, "records": [compact_record(record) for record in cell_records]}
        if self.stored.get(method, {}).get(task) != cell:
            self.stored.setdefault(method, {})[task] = cell
            files.write_json_atomically(self.records_file, self.stored)


def paired_with_base(
    out: pathlib.Path, method: str, task: str, cell_records: list[dict]
) -> dict | None:
    """The cell's paired difference from its task's base cell (None for base itself or without
    a base cell). Compacted ids let a cell run here pair with a base seeded from --records."""
    base_dir = out / "base" / task
    if method == "base" or not (base_dir / "summary.json").exists():
        return None
    base_records, _ = read_cell(base_dir)
    return evaluation.paired_difference(compact_by_id(base_records), compact_by_id(cell_records))


def main() -> None:
    args = parse_args()
    cells = Cells.from_args(args)
    records: dict[str, dict[str, list[dict]]] = {}
    summaries: dict[str, dict[str, dict]] = {}
    for task, method in itertools.product(args.tasks.split(","), args.methods.split(",")):
        finished = cells.restored(method, task)
        if args.report_only and not finished:
            print(f"{method} {task}: not run")
            continue
        if args.restart or not finished:
            cells.run(method, task)
        cell_records, summary = read_cell(cells.directory(method, task))
        cells.keep(method, task, cell_records, dict(summary))  # as written: no vs_base
        vs_base = paired_with_base(cells.out, method, task, cell_records)
        if vs_base is not None:
            summary["vs_base"] = vs_base
        records.setdefault(method, {})[task] = cell_records
        summaries.setdefault(method, {})[task] = summary
        print(f"{method} {task}: {summary['accuracy']:.4f} (n={summary['n']})")
    expert_names = tuple(expert_paths(args.model, args.experts))
    write_reports(cells.out, args.model, expert_names, records, summaries)


def load_expert_model(args) -> ExpertModel:
    """The model with its experts (and the classifier, when given)."""
    experts, classifier = load_named_experts(args.model, args.experts, args.cls_expert)
    loaded = load_model(args.model)
    return build_expert_model(loaded, experts, classifier, cache_root=args.cache_dir)


if __name__ == "__main__":
    main()

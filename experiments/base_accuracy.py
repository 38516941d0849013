"""Base-model accuracy of registry models on the paper's benchmarks (issue 4's README table).

Each cell is one `t2jax.evaluation.evaluate_model` run, as `t2jax eval` makes it (official
prompts, budgets and scorers, greedy), written to OUT/MODEL/TASK/ and resumed from there if
interrupted; the combined table goes to OUT/table.md and OUT/table.json.

    nice -n 19 python experiments/base_accuracy.py \\
        --models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct \\
        --sample gsm8k=128,arc_easy=128,arc_challenge=128,math=64 --out runs/base_accuracy

`--sample TASK=N` evaluates a seeded random subset of N items (seed 0, `t2jax eval --sample`);
tasks not named there run on their full split.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax.numpy as jnp

from t2jax.config import MeshConfig
from t2jax.evaluation import evaluate_model, subsample
from t2jax.loading import load_model
from t2jax.sampler import Sampler
from t2jax.tasks import get_task

# (task, split) of each column, in the README's order.
COLUMNS = (
    ("gsm8k", "test"),
    ("arc_easy", "test"),
    ("arc_challenge", "test"),
    ("mbpp", "test"),
    ("humaneval", "test"),
    ("math", "math500"),
)
COLUMN_NAMES = {
    "gsm8k": "GSM8K test",
    "arc_easy": "ARC-Easy test",
    "arc_challenge": "ARC-Challenge test",
    "mbpp": "MBPP+ test",
    "humaneval": "HumanEval",
    "math": "MATH-500",
}
SEED = 0  # of the --sample subsets, as `t2jax eval --sample`


def parse_sizes(text: str) -> dict[str, int]:
    """ "gsm8k=128,math=64" -> {"gsm8k": 128, "math": 64}."""
    sizes = {}
    for part in filter(None, text.split(",")):
        task, _, size = part.partition("=")
        if task not in COLUMN_NAMES or not size.isdigit():
            raise SystemExit(f"bad --sample entry {part!r}; expected TASK=N with TASK in {COLUMNS}")
        sizes[task] = int(size)
    return sizes


def evaluate_cell(sampler: Sampler, model: str, task_name: str, split: str, size, args) -> dict:
    """Evaluates one cell (resuming its records) with `t2jax eval`'s defaults; its summary."""
    task = get_task(task_name)
    examples = task.load(split, data_dir=args.data_dir)
    if size is not None:
        examples = subsample(examples, size, SEED)
    config = {
        "model": model,
        "split": split,
        "limit": None,
        "sample": size,
        "seed": SEED,
        "max_new_tokens": task.max_new_tokens,
        "official_quirks": False,
    }
    out = cell_dir(args, model, task_name)
    summary = evaluate_model(sampler, task, examples, out, args.batch_size, config=config)
    print(json.dumps({key: summary[key] for key in ("task", "n", "accuracy", "standard_error")}))
    print(f"records: {out}")
    return summary


def cell_dir(args, model: str, task: str) -> pathlib.Path:
    """OUT/MODEL/TASK: the records and summary of one cell."""
    return pathlib.Path(args.out) / pathlib.Path(model).name.removesuffix(".gguf") / task


def table(summaries: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per model, accuracy % +- standard error (N) per column."""
    header = "| model | " + " | ".join(COLUMN_NAMES[task] for task, _ in COLUMNS) + " |"
    lines = [header, "|---|" + "---:|" * len(COLUMNS)]
    for model, cells in summaries.items():
        values = []
        for task, _ in COLUMNS:
            summary = cells.get(task)
            if summary is None:
                values.append("not run")
                continue
            accuracy, error = 100 * summary["accuracy"], 100 * summary["standard_error"]
            values.append(f"{accuracy:.1f} ± {error:.1f} (N={summary['n']})")
        lines.append(f"| {model} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--tasks", default=",".join(task for task, _ in COLUMNS))
    parser.add_argument("--sample", default="", help="TASK=N,... seeded subsets (default: full)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/base_accuracy")
    args = parser.parse_args()
    sizes = parse_sizes(args.sample)
    tasks = set(args.tasks.split(","))

    summaries: dict[str, dict[str, dict]] = {}
    dtype = None if args.dtype is None else jnp.dtype(args.dtype)
    for model in args.models.split(","):
        summaries[model] = {}
        sampler = Sampler.for_model(load_model(model, dtype=dtype, mesh_config=MeshConfig()))
        for task, split in COLUMNS:
            if task not in tasks:
                continue
            print(f"== {model}: {task} {split}", flush=True)
            summaries[model][task] = evaluate_cell(
                sampler, model, task, split, sizes.get(task), args
            )
            out = pathlib.Path(args.out)
            (out / "table.md").write_text(table(summaries))
            (out / "table.json").write_text(json.dumps(summaries, indent=2) + "\n")
    print(table(summaries))


if __name__ == "__main__":
    main()

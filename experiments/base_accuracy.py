"""Base-model accuracy of registry models on the paper's benchmarks (issue 4's README table).

Each cell is one `t2jax eval` run (official prompts, budgets and scorers, greedy), written to
OUT/MODEL/TASK-SPLIT/ and resumed from there if interrupted; the combined table goes to
OUT/table.md and OUT/table.json.

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

from t2jax.cli import app as cli

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


def parse_sizes(text: str) -> dict[str, int]:
    """ "gsm8k=128,math=64" -> {"gsm8k": 128, "math": 64}."""
    sizes = {}
    for part in filter(None, text.split(",")):
        task, _, size = part.partition("=")
        if task not in COLUMN_NAMES or not size.isdigit():
            raise SystemExit(f"bad --sample entry {part!r}; expected TASK=N with TASK in {COLUMNS}")
        sizes[task] = int(size)
    return sizes


def eval_command(model: str, task: str, split: str, size: int | None, args) -> list[str]:
    """The `t2jax eval` arguments of one cell."""
    command = ["eval", "--model", model, "--task", task, "--split", split]
    command += ["--batch-size", str(args.batch_size), "--out", str(cell_dir(args, model, task))]
    if size is not None:
        command += ["--sample", str(size)]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    if args.dtype:
        command += ["--dtype", args.dtype]
    return command


def cell_dir(args, model: str, task: str) -> pathlib.Path:
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
    for model in args.models.split(","):
        summaries[model] = {}
        for task, split in COLUMNS:
            if task not in tasks:
                continue
            command = eval_command(model, task, split, sizes.get(task), args)
            print("t2jax " + " ".join(command), flush=True)
            if cli.main(command) != 0:
                raise SystemExit(f"t2jax eval failed for {model} / {task}")
            summary_path = cell_dir(args, model, task) / "summary.json"
            summaries[model][task] = json.loads(summary_path.read_text())
            out = pathlib.Path(args.out)
            (out / "table.md").write_text(table(summaries))
            (out / "table.json").write_text(json.dumps(summaries, indent=2) + "\n")
    print(table(summaries))


if __name__ == "__main__":
    main()

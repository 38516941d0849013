"""The paper's Table 4 ablation at a CPU budget: SVF against LoRA / IA3 / DoRA, policy gradient
against next-token prediction, on one training task, with the unseen-task column.

Every arm trains with the same recipe (`RECIPE`: batch, updates, token budget, validation) except
its method, objective, modules and learning rate (`ARMS`), through `t2jax.rl.trainer`. Every arm is
judged by its final parameters, after the same number of updates: the trainer's validation (50
seeded items after the first and the last update) only draws the curves, because on so few items the
official keep-the-strictly-best rule picks noise (ties keep the first checkpoint). Then the base
model and every arm's final parameters answer the same held-out items: the first N test items of the
task and of its unseen task (ARC-Easy -> ARC-Challenge, GSM8K -> MATH-500), both with the training
task's token budget (`TOKEN_BUDGETS`; 32 tokens for ARC as the shipped reasoning expert). Each arm
lives in OUT/TASK/ARM/ (run directory, then test/ and unseen/ records); a killed command resumes
where it stopped (training from its checkpoint, evaluations from their records). The table goes to
OUT/TASK/table.md and table.json: accuracy, difference to base with its paired standard error,
trainable parameters, training wall time; items.json keeps every arm's per-item correctness
(under anonymous ids) and recipe.json the settings every arm shares. --records DIR keeps those
files where they can be committed: arms finished there are neither trained nor evaluated again,
their rows and items are read from DIR, and DIR is rewritten with every finished arm, so a table
that takes several sessions survives a lost machine.

    T2JAX_DATA=../shared/data python experiments/ablation.py --task arc_easy --out runs/ablation
    python experiments/ablation.py --task gsm8k --arms base,svf-pg-mlp,lora-ntp-attention \\
        --records experiments/records/ablation/gsm8k
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

from t2jax import configuration, files
from t2jax.adapted import Choice
from t2jax.adapters import peft_format
from t2jax.checkpoints import load_checkpoint
from t2jax.config import ModelSection
from t2jax.evaluation import (
    SAMPLES_FILE,
    anonymous_id,
    evaluate_model,
    paired_statistics,
    read_records,
    standard_error,
)
from t2jax.loading import load_model_section
from t2jax.rl import config as rl_config
from t2jax.rl.run_dir import SUMMARY_FILE, expert_name
from t2jax.rl.setup import Setup, load_setup
from t2jax.rl.trainer import Trainer
from t2jax.sampler import Sampler
from t2jax.svf import experts as experts_lib
from t2jax.svf import targets as svf_targets
from t2jax.tasks import get_task

IA3_MODULES = rl_config.BASELINE_TARGETS["ia3"]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row of Table 4."""

    method: str  # svf, lora, ia3, dora
    objective: str  # rl, ntp
    modules: str  # target spec (svf.targets or adapter.targets)
    lr: float


ARMS = {  # in the order "all" runs them: the central comparisons first
    "svf-pg-mlp": Arm("svf", "rl", "mlp", 1e-2),
    "lora-ntp-attention": Arm("lora", "ntp", "qv", 5e-4),
    "svf-ntp-attention": Arm("svf", "ntp", "qv", 1e-2),
    "lora-pg-attention": Arm("lora", "rl", "qv", 5e-4),
    "ia3-ntp": Arm("ia3", "ntp", IA3_MODULES, 1e-2),
    "dora-ntp-attention": Arm("dora", "ntp", "qv", 5e-4),
    "svf-pg-attention": Arm("svf", "rl", "qv", 1e-2),
    "svf-pg-both": Arm("svf", "rl", "qv,mlp", 1e-2),
    "lora-ntp-both": Arm("lora", "ntp", "qv,mlp", 5e-4),
}
UNSEEN = {"arc_easy": ("arc_challenge", "test"), "gsm8k": ("math", "math500")}
MODULE_NAMES = {
    "mlp": "MLP",
    "qv": "attention (q, v)",
    "qv,mlp": "MLP + attention",
    IA3_MODULES: "k, v, down",
}
# The recipe every arm shares (the shipped reasoning expert's, `t2jax/shipped_experts`).
RECIPE = {
    "rl.batch_size": 16,
    "rl.num_iters": 10,
    "rl.eval_every": 10,  # validation after update 1 and after the last
    "rl.logprob_chunk": 64,
    "rl.require_extracted_answer": True,
    "task.valid_sample": 50,
    "task.eval_train_limit": 0,
    "task.rows_per_call": 50,
}
TOKEN_BUDGETS = {"arc_easy": 32, "gsm8k": 256}
COLUMNS = ("test", "unseen")
OUTPUT_FILES = ("table.md", "table.json", "items.json", "recipe.json")


def token_budget(args: argparse.Namespace) -> int:
    """The answer budget of training and of both test columns."""
    return args.max_new_tokens or TOKEN_BUDGETS[args.task]


def shared_recipe(args: argparse.Namespace) -> dict:
    """The settings every arm of one table shares (recipe.json): arms run with other settings
    do not belong in the same table."""
    return {
        "model": args.model,
        "task": args.task,
        "max_new_tokens": token_budget(args),
        "test_n": args.test_n,
        "unseen_n": args.unseen_n,
        **RECIPE,
        "rl.num_iters": args.updates,
    }


def arm_config(name: str, args: argparse.Namespace) -> rl_config.TrainConfig:
    """The training config of arm `name`."""
    arm = ARMS[name]
    targets = (
        {"svf.targets": arm.modules} if arm.method == "svf" else {"adapter.targets": arm.modules}
    )
    overrides = {
        **RECIPE,
        "model.name": args.model,
        "task.name": args.task,
        "task.data_dir": args.data_dir,
        "task.max_new_tokens": token_budget(args),
        "rl.num_iters": args.updates,
        "rl.microbatch_size": args.microbatch_size,  # memory, not results: not in recipe.json
        "rl.remat": True,  # GSM8K at microbatch 8: 8.2 GB resident and 1.25x faster than
        # microbatch 4 without it, which peaked at 16.4 GB (docs/ablation.md)
        "rl.objective": arm.objective,
        "rl.lr": arm.lr,
        "adapter.method": arm.method,
        "run.workdir": str(args.out / args.task / name),
        "run.progress": True,
        **targets,
    }
    return configuration.with_overrides(rl_config.TrainConfig(), overrides)


def parameter_count(setup_config: rl_config.TrainConfig, model_config) -> int:
    """Trainable parameters of an arm on the model."""
    adapter = setup_config.adapter
    if adapter.method == "svf":
        targets = svf_targets.resolve_targets(setup_config.svf.targets)
        return svf_targets.svf_param_count(model_config, targets)
    targets = svf_targets.resolve_targets(adapter.baseline_targets)
    return svf_targets.adapter_param_count(model_config, adapter.method, targets, adapter.rank)


def final_choice(setup: Setup, summary: dict) -> Choice:
    """The run's final parameters."""
    method = setup.config.adapter.method
    path = pathlib.Path(summary["final_expert"])
    if method == "svf":
        return experts_lib.load_expert(path).z()
    return peft_format.load_peft(path, setup.model.config)


def evaluate_columns(sampler: Sampler, directory: pathlib.Path, args) -> dict[str, dict]:
    """Test and unseen-task accuracies of a sampler, records in directory/{test,unseen}, both
    with the training task's token budget (the answer format the arms were trained for)."""
    results = {}
    unseen_task, unseen_split = UNSEEN[args.task]
    for column, task_name, split, size in zip(
        COLUMNS,
        (args.task, unseen_task),
        ("test", unseen_split),
        (args.test_n, args.unseen_n),
        strict=True,
    ):
        task = get_task(task_name)
        examples = task.load(split, data_dir=args.data_dir)[:size]
        results[column] = evaluate_model(
            sampler,
            task,
            examples,
            directory / column,
            RECIPE["task.rows_per_call"],
            token_budget(args),
            config={"split": split, "limit": size},
        )
    return results


def run_arm(name: str, args) -> None:
    """Trains (or resumes) arm `name`, then evaluates its final parameters."""
    config = arm_config(name, args)
    workdir = pathlib.Path(config.run.workdir)
    setup = load_setup(config)
    summary_path = workdir / SUMMARY_FILE
    if not summary_path.exists():
        Trainer(setup).run()
    summary = json.loads(summary_path.read_text())
    evaluate_columns(setup.model.sampler_for(final_choice(setup, summary)), workdir, args)


def run_base(args) -> None:
    """Evaluates the base model (the weights as loaded)."""
    loaded = load_model_section(ModelSection(name=args.model), progress=True)
    evaluate_columns(Sampler.for_model(loaded), args.out / args.task / "base", args)


def finished(directory: pathlib.Path) -> bool:
    """Whether an arm (or base) has both columns evaluated."""
    return all((directory / column / "summary.json").exists() for column in COLUMNS)


def arm_row(name: str, args, model_config) -> dict:
    """The table row of a finished arm."""
    if name == "base":
        return {"arm": "base", "method": "base", "objective": "", "modules": "", "parameters": 0}
    config = arm_config(name, args)
    summary = json.loads((pathlib.Path(config.run.workdir) / SUMMARY_FILE).read_text())
    return {
        "arm": name,
        "method": config.adapter.method,
        "objective": config.rl.objective,
        "modules": ARMS[name].modules,
        "lr": ARMS[name].lr,
        "parameters": parameter_count(config, model_config),
        "train_minutes": summary["train_seconds"] / 60,
        "updates": summary["steps"],
        "final": expert_name("final", config.adapter.method),
    }


def cell(base_items: dict[str, int], arm_items: dict[str, int], is_base: bool) -> dict:
    """Accuracy of an arm's column, from its per-item correctness (`item_results`), and its
    paired difference to base over the same items."""
    correct = sum(arm_items.values())
    out = {
        "accuracy": correct / len(arm_items),
        "standard_error": standard_error(correct, len(arm_items)),
        "n": len(arm_items),
    }
    if not is_base:
        if set(arm_items) != set(base_items):
            raise SystemExit(
                f"an arm answered other items than base ({len(arm_items)} vs "
                f"{len(base_items)}); rerun both with the same --test-n / --unseen-n"
            )
        shared = sorted(base_items)
        out["vs_base"] = paired_statistics(
            [base_items[i] for i in shared], [arm_items[i] for i in shared]
        )
    return out


def item_results(root: pathlib.Path, names: list[str]) -> dict:
    """{arm: {column: {anonymous item id: 1 if correct else 0}}}: the per-item evidence behind
    the table, small enough to keep when the run directories are gone, naming no benchmark item
    (`evaluation.anonymous_id`)."""
    results = {}
    for name in names:
        for column in COLUMNS:
            records = read_records(root / name / column / SAMPLES_FILE)
            results.setdefault(name, {})[column] = dict(
                sorted(
                    (anonymous_id(item), int(record["correct"])) for item, record in records.items()
                )
            )
    return results


def table(rows: list[dict], items: dict, args) -> str:
    """The Markdown table of Table 4's shape; fills each row's test and unseen cells (`cell`)."""
    unseen = UNSEEN[args.task][0]
    lines = [
        f"| arm | method | objective | modules | #params | {args.task} test | vs base "
        f"| {unseen} | vs base | train min |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        columns = []
        for column in COLUMNS:
            result = cell(items["base"][column], items[row["arm"]][column], row["arm"] == "base")
            row[column] = result
            columns.append(f"{100 * result['accuracy']:.1f} ± {100 * result['standard_error']:.1f}")
            comparison = result.get("vs_base")
            columns.append(
                "–"
                if comparison is None
                else f"{100 * comparison['difference']:+.1f} ± "
                f"{100 * comparison['difference_standard_error']:.1f}"
            )
        minutes = row.get("train_minutes")
        lines.append(
            f"| {row['arm']} | {row['method']} | {row['objective']} "
            f"| {MODULE_NAMES.get(row['modules'], row['modules'])} | {row['parameters']:,} "
            f"| {columns[0]} | {columns[1]} | {columns[2]} | {columns[3]} "
            f"| {'' if minutes is None else f'{minutes:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Stored:
    """The rows and per-item correctness of the arms a --records directory holds."""

    rows: dict[str, dict]
    items: dict[str, dict]


def read_stored(directory: pathlib.Path | None, recipe: dict) -> Stored:
    """The arms finished in a --records directory (none when it is None or empty); a directory
    written with other shared settings is an error naming them."""
    if directory is None or not (directory / "table.json").exists():
        return Stored({}, {})
    try:
        stored_recipe = json.loads((directory / "recipe.json").read_text())
        rows = json.loads((directory / "table.json").read_text())
        items = json.loads((directory / "items.json").read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--records {directory}: unreadable ({error})") from error
    differing = sorted(
        key
        for key in recipe.keys() | stored_recipe.keys()
        if recipe.get(key) != stored_recipe.get(key)
    )
    if differing:
        raise SystemExit(
            f"--records {directory} holds arms run with other settings: "
            + ", ".join(
                f"{key} {stored_recipe.get(key)} there, {recipe.get(key)} here" for key in differing
            )
        )
    by_arm = {row["arm"]: row for row in rows}
    unknown = sorted(set(by_arm) - {"base", *ARMS})
    if unknown or set(by_arm) != set(items):
        raise SystemExit(
            f"--records {directory}: rows {sorted(by_arm)} and items {sorted(items)} "
            f"do not name the same known arms"
        )
    return Stored(by_arm, items)


def write_outputs(
    directory: pathlib.Path, markdown: str, rows: list[dict], items: dict, recipe: dict
) -> None:
    """OUTPUT_FILES in directory, each replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = (
        markdown,
        json.dumps(rows, indent=2) + "\n",
        json.dumps(items) + "\n",
        json.dumps(recipe, indent=2) + "\n",
    )
    for name, text in zip(OUTPUT_FILES, texts, strict=True):
        files.write_text_atomically(directory / name, text)


def report(args, recipe: dict, stored: Stored) -> str:
    """The table of every arm finished under --out or in --records (`table`), written with its
    evidence to OUT/TASK and to --records (`write_outputs`); returns its Markdown."""
    root = args.out / args.task
    local = [name for name in ("base", *ARMS) if finished(root / name)]
    if "base" not in local and "base" not in stored.rows:
        raise SystemExit(f"base is not evaluated in {root} (run it: --arms base)")
    trained = [name for name in local if name != "base"]  # their rows count parameters
    model_config = load_checkpoint(args.model, progress=False).config if trained else None
    local_items = item_results(root, local)
    rows, items = [], {}
    for name in ("base", *ARMS):
        if name in local:
            rows.append(arm_row(name, args, model_config))
            items[name] = local_items[name]
        elif name in stored.rows:
            rows.append(stored.rows[name])
            items[name] = stored.items[name]
    markdown = table(rows, items, args)
    write_outputs(root, markdown, rows, items, recipe)
    if args.records:
        write_outputs(args.records, markdown, rows, items, recipe)
    return markdown


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(UNSEEN), default="arc_easy")
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--arms", default="all", help=f"comma list of base and {sorted(ARMS)}")
    parser.add_argument("--updates", type=int, default=RECIPE["rl.num_iters"])
    parser.add_argument(
        "--microbatch-size",
        type=int,
        default=8,
        help="rows per gradient microbatch: peak memory, not results (gradients are summed)",
    )
    parser.add_argument("--test-n", type=int, default=300)
    parser.add_argument("--unseen-n", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/ablation"))
    parser.add_argument(
        "--records",
        type=pathlib.Path,
        default=None,
        help="directory of committed results: its finished arms are not rerun, and it is "
        "rewritten with every arm finished here",
    )
    parser.add_argument(
        "--report", action="store_true", help="only write the table of the arms already finished"
    )
    args = parser.parse_args(argv)
    names = ["base", *ARMS] if args.arms == "all" else args.arms.split(",")
    unknown = sorted(set(names) - {"base", *ARMS})
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; use base or {sorted(ARMS)}")
    if names[0] != "base":
        names.insert(0, "base")  # every difference is against the base model's answers
    recipe = shared_recipe(args)
    stored = read_stored(args.records, recipe)
    root = args.out / args.task
    began = time.perf_counter()
    markdown = None
    for name in [] if args.report else names:
        done_here = finished(root / name)
        if done_here or name in stored.rows:
            print(f"{name}: finished in {root / name if done_here else args.records}")
            continue
        if name == "base":
            run_base(args)
        else:
            run_arm(name, args)
        markdown = report(args, recipe, stored)  # --records keeps every arm as it finishes
    print(markdown or report(args, recipe, stored))
    print(f"{root / 'table.md'} ({(time.perf_counter() - began) / 60:.1f} min)")


if __name__ == "__main__":
    main()

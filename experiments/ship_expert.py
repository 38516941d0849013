"""Ships a trained expert: copies a finished `t2jax train` run's best expert to
`t2jax/shipped_experts/MODEL/NAME.safetensors` with its card (NAME.json for programs, NAME.md for
people): the command, the resolved config, data splits, commit, wall time, machine, the learning
record and the held-out test accuracy against the base model with the paired standard error.

    python experiments/ship_expert.py --run runs/reasoning-qwen05 --name reasoning \\
        --command "t2jax train --config=..." --machine "2-core x86_64 VM, AVX512-BF16, 24 GiB"
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

from t2jax.files import write_atomically, write_json_atomically, write_text_atomically
from t2jax.svf import experts as experts_lib
from t2jax.svf import shipped

# The aim of the shipped experts (issue 16): beat the base model on the task's own test split by
# more than this many paired standard errors.
AIM_STANDARD_ERRORS = 2.0
OBJECTIVES = {"rl": "REINFORCE", "ntp": "next-token prediction on reference answers"}


def card(run: pathlib.Path, name: str, command: str, machine: str, notes: str) -> dict:
    """The machine-readable card of a finished run's best expert."""
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    info = json.loads((run / "run_info.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    test = summary.get("test_vs_base")
    if test is None:
        raise SystemExit(f"{run} has no test_vs_base in summary.json: train with a test split")
    # With a paired SE of 0 every test item moved the same way: no ratio, the sign decides.
    error = test["difference_standard_error"]
    separation = test["difference"] / error if error > 0 else None
    aim_met = test["difference"] > 0 if separation is None else separation > AIM_STANDARD_ERRORS
    return {
        "model": config["model"]["name"],
        "name": name,
        "task": config["task"]["name"],
        "command": command,
        "config": config,
        "splits": {
            key: config["task"][key]
            for key in ("train_split", "valid_split", "valid_sample", "test_split", "test_limit")
        },
        "commit": info.get("git_revision"),
        "jax_version": info.get("jax_version"),
        "machine": machine,
        "train_seconds": summary["train_seconds"],
        "updates": summary["steps"],
        "best_step": summary["best_step"],
        "valid": summary.get("valid_vs_base"),
        "test": test,
        "test_standard_errors": separation,
        "aim_met": aim_met,
        "validation_curve": [
            {"step": m["step"], "accuracy": m["eval/valid/accuracy"]}
            for m in metrics
            if "eval/valid/accuracy" in m
        ],
        "notes": notes,
    }


def markdown(card: dict) -> str:
    """The human-readable card."""
    test, valid = card["test"], card["valid"] or {}
    aim = "met" if card["aim_met"] else "NOT met"
    curve = card["validation_curve"]

    def percent(value: float) -> str:
        return f"{100 * value:.1f}%"

    lines = [
        f"# {card['name']} expert for {card['model']}",
        "",
        f"SVF expert trained with {OBJECTIVES[card['config']['rl'].get('objective', 'rl')]} on "
        f"{card['task']} ({card['updates']} updates, best "
        f"validation accuracy after update {card['best_step']}).",
        "",
        "| split | N | base | expert | difference ± paired SE |",
        "|---|---:|---:|---:|---:|",
    ]
    for split, result in (("valid (selects the expert)", valid), ("test (untouched)", test)):
        if result:
            lines.append(
                f"| {split} | {result['n']} | {percent(result['base_accuracy'])} | "
                f"{percent(result['accuracy'])} | {100 * result['difference']:+.1f} ± "
                f"{100 * result['difference_standard_error']:.1f} points |"
            )
    separation = (
        f"{card['test_standard_errors']:.1f} SE"
        if card["test_standard_errors"] is not None
        else "paired SE 0: every test item moved the same way"
    )
    lines += [
        "",
        f"Aim (test difference > {AIM_STANDARD_ERRORS:g} paired SE): {aim} ({separation}).",
        "",
        "Validation accuracy per evaluation: "
        + ", ".join(f"{percent(e['accuracy'])} (step {e['step']})" for e in curve),
        "",
        f"Training wall time {card['train_seconds'] / 60:.1f} min on {card['machine']}; commit "
        f"{card['commit']}, jax {card['jax_version']}.",
        "",
        "```bash",
        card["command"],
        "```",
    ]
    if card["notes"]:
        lines += ["", card["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished `t2jax train` run directory")
    parser.add_argument("--name", required=True, help="math, code, reasoning or cls")
    parser.add_argument("--command", required=True, help="the training command, for the card")
    parser.add_argument("--machine", required=True, help="where it was trained, for the card")
    parser.add_argument("--notes", default="", help="a paragraph for the card")
    args = parser.parse_args()
    run = pathlib.Path(args.run)
    result = card(run, args.name, args.command, args.machine, args.notes)
    experts_lib.load_expert(run / "best_expert.safetensors")  # a readable, valid expert file
    target = shipped.SHIPPED_DIR / shipped.model_key(result["model"])
    target.mkdir(parents=True, exist_ok=True)
    write_atomically(
        target / f"{args.name}.safetensors",
        lambda part: shutil.copyfile(run / "best_expert.safetensors", part),
    )
    write_json_atomically(target / f"{args.name}.json", result)
    write_text_atomically(target / f"{args.name}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

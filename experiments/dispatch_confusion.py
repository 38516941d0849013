"""Pass 1 alone: how a dispatch strategy routes the reported items of MATH, HumanEval and
ARC-Challenge (the paper's Fig. 6), for the official generate-and-parse and the likelihood
dispatch. Writes OUT/METHOD.json (per-item categories and the confusion counts) and
OUT/confusion.png; resumable per method.

    python experiments/dispatch_confusion.py --model qwen2.5-coder-0.5b-instruct \\
        --experts builtin --methods likelihood,generate --limit 100 --out runs/dispatch
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from t2jax import reports
from t2jax.adaptation.config import FewShotConfig
from t2jax.adaptation.dispatch import classify, dispatch_confusion
from t2jax.adaptation.expert_model import build_expert_model, load_named_experts
from t2jax.adaptation.few_shot import split_items
from t2jax.files import write_json_atomically
from t2jax.loading import load_model
from t2jax.tasks import get_task


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--experts", default="builtin", help="NAME=PATH,... or builtin")
    parser.add_argument("--cls-expert", default=None, help="adds the cls strategy's rows")
    parser.add_argument("--methods", default="likelihood,generate")
    parser.add_argument("--tasks", default=",".join(reports.TABLE2_TASKS))
    parser.add_argument("--limit", type=int, default=100, help="reported items per task")
    parser.add_argument("--classify-max-new-tokens", type=int, default=64)
    parser.add_argument("--rows-per-call", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/dispatch")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    experts, classifier = load_named_experts(args.model, args.experts, args.cls_expert)
    model = build_expert_model(load_model(args.model), experts, classifier)
    questions = {}
    for name in args.tasks.split(","):
        task = get_task(name)
        reported = split_items(name, task.load("test", data_dir=args.data_dir), FewShotConfig())[1]
        questions[name] = [item.question for item in reported[: args.limit]]
    strategies = [("prompt", False)] + ([("cls", True)] if classifier is not None else [])
    matrices = {}
    for method in args.methods.split(","):
        for strategy, use_classifier in strategies:
            path = out / f"{strategy}-{method}.json"
            if not path.exists():
                start = time.perf_counter()
                categories = {
                    name: list(
                        classify(
                            model,
                            texts,
                            use_classifier=use_classifier,
                            method=method,
                            max_new_tokens=args.classify_max_new_tokens,
                            rows_per_call=args.rows_per_call,
                        ).categories
                    )
                    for name, texts in questions.items()
                }
                counts = dispatch_confusion(categories)
                write_json_atomically(
                    path,
                    {
                        "strategy": strategy,
                        "method": method,
                        "n_per_task": args.limit,
                        "seconds": time.perf_counter() - start,
                        "categories": categories,
                        "confusion": counts.tolist(),
                    },
                )
            record = json.loads(path.read_text())
            matrices[f"{strategy} ({method})"] = np.asarray(record["confusion"])
            print(path, json.dumps(record["confusion"]), f"{record['seconds']:.0f} s")
    reports.plot_confusions(matrices, out / "confusion.png")


if __name__ == "__main__":
    main()

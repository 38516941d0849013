"""Pass 1 alone: how a dispatch strategy routes the reported items of MATH, HumanEval and
ARC-Challenge (the paper's Fig. 6), for the official generate-and-parse, the likelihood and the
calibrated-likelihood dispatches. Writes OUT/STRATEGY-METHOD.json (per-item categories and the
confusion counts, and for the likelihood methods the label scores) and OUT/confusion.png;
resumable per method. "likelihood" is read off the "calibrated" run's scores when both are asked
for (the same forward passes).

    python experiments/dispatch_confusion.py --model qwen2.5-coder-0.5b-instruct \\
        --experts builtin --methods generate,likelihood,calibrated --limit 100 \\
        --out runs/dispatch
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from t2jax import reports
from t2jax.adaptation.config import FewShotConfig
from t2jax.adaptation.dispatch import classify, dispatch_confusion, most_likely_labels
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
    parser.add_argument("--methods", default="generate,likelihood,calibrated")
    parser.add_argument("--tasks", default=",".join(reports.TABLE2_TASKS))
    parser.add_argument("--limit", type=int, default=100, help="reported items per task")
    parser.add_argument("--classify-max-new-tokens", type=int, default=64)
    parser.add_argument("--rows-per-call", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/dispatch")
    return parser.parse_args()


def uncalibrated(calibrated: dict) -> dict:
    """The "likelihood" record read off a "calibrated" one: the same label scores without the
    content-free prior (no model call; `seconds` is the calibrated run's)."""
    scores = {name: np.asarray(s) for name, s in calibrated["label_scores"].items()}
    categories = {name: list(most_likely_labels(s)) for name, s in scores.items()}
    return {
        **calibrated,
        "method": "likelihood",
        "categories": categories,
        "confusion": dispatch_confusion(categories).tolist(),
        "label_prior": None,
        "derived_from": "calibrated",
    }


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
    # "likelihood" takes the uncalibrated scores of a "calibrated" run when there is one.
    methods = sorted(args.methods.split(","), key=lambda m: m == "likelihood")
    matrices = {}
    for method in methods:
        for strategy, use_classifier in strategies:
            path = out / f"{strategy}-{method}.json"
            calibrated = out / f"{strategy}-calibrated.json"
            if not path.exists() and method == "likelihood" and calibrated.exists():
                write_json_atomically(path, uncalibrated(json.loads(calibrated.read_text())))
            if not path.exists():
                start = time.perf_counter()
                dispatches = {
                    name: classify(
                        model,
                        texts,
                        use_classifier=use_classifier,
                        method=method,
                        max_new_tokens=args.classify_max_new_tokens,
                        rows_per_call=args.rows_per_call,
                    )
                    for name, texts in questions.items()
                }
                categories = {name: list(d.categories) for name, d in dispatches.items()}
                record = {
                    "strategy": strategy,
                    "method": method,
                    "n_per_task": args.limit,
                    "seconds": time.perf_counter() - start,
                    "categories": categories,
                    "confusion": dispatch_confusion(categories).tolist(),
                }
                if method != "generate":
                    record["label_scores"] = {
                        name: d.label_scores.tolist() for name, d in dispatches.items()
                    }
                    prior = next(iter(dispatches.values())).label_prior
                    record["label_prior"] = None if prior is None else prior.tolist()
                write_json_atomically(path, record)
            record = json.loads(path.read_text())
            matrices[f"{strategy} ({method})"] = np.asarray(record["confusion"])
            print(path, json.dumps(record["confusion"]), f"{record['seconds']:.0f} s")
    reports.plot_confusions(matrices, out / "confusion.png")


if __name__ == "__main__":
    main()

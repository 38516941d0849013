"""The paper's Table 2 on subsets: base / prompt / cls-expert / few-shot on MATH, HumanEval and
ARC-Challenge, with Table 3 (pass timings of the prompt strategy), the dispatch confusion matrices
(Fig. 6) and the learned alpha (Fig. 7). All logic is in `t2jax.adapt` and `t2jax.reports`.

Every method answers the same items of each test split: the first --limit of those left after
the official few-shot shots (seeds 27 / 16 / 38), the items the few-shot strategy reports on.

    nice -n 19 python experiments/adapt_table2.py --model smollm2-135m-instruct \\
        --experts math=gsm8k.safetensors,code=mbpp.safetensors,reasoning=arc_easy.safetensors \\
        --cls-expert cls.safetensors --limit 50 --out runs/table2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from t2jax import adapt, adapt_cli, reports
from t2jax import experts as experts_lib
from t2jax.loading import load_model
from t2jax.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--experts", required=True, help="math=PATH,code=PATH,reasoning=PATH")
    parser.add_argument("--cls-expert", default=None, help="needed for the cls method")
    parser.add_argument("--tasks", default=",".join(reports.TABLE2_TASKS))
    parser.add_argument("--methods", default=",".join(reports.METHODS))
    parser.add_argument("--limit", type=int, default=50, help="reported items per task")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's")
    parser.add_argument("--classify-max-new-tokens", type=int, default=512)
    parser.add_argument("--generations", type=int, default=50, help="CEM generations")
    parser.add_argument("--alpha-shape", choices=("per-matrix", "global"), default="per-matrix")
    parser.add_argument("--mix-space", choices=("z", "p"), default="z")
    parser.add_argument("--rows-per-call", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/table2")
    args = parser.parse_args()

    paths = adapt_cli.parse_expert_paths(args.experts)
    experts = {name: experts_lib.load_expert(path) for name, path in paths.items()}
    classifier = experts_lib.load_expert(args.cls_expert) if args.cls_expert else None
    loaded = load_model(args.model)
    model = adapt.build_expert_model(loaded, experts, classifier)
    few_shot = adapt.FewShotConfig(
        generations=args.generations,
        alpha_shape=args.alpha_shape.replace("-", "_"),
        mix_space=args.mix_space,
        rows_per_call=args.rows_per_call,
    )
    out = pathlib.Path(args.out)
    results: dict[str, dict[str, dict]] = {}
    runs: dict[str, dict[str, adapt.AdaptRun]] = {}
    for task_name in args.tasks.split(","):
        task = get_task(task_name)
        items = task.load("test", data_dir=args.data_dir)
        options = adapt.AdaptOptions(
            max_new_tokens=args.max_new_tokens or task.max_new_tokens,
            stop_strings=tuple(task.stop_strings),
            rows_per_call=args.rows_per_call,
            classify_max_new_tokens=args.classify_max_new_tokens,
            few_shot=few_shot,
        )
        for method in args.methods.split(","):
            run = adapt.evaluate_method(
                model, method, task, items, options, limit=args.limit, progress=True
            )
            records, summary = adapt.score_run(run, task)
            run_dir = out / method / task_name
            run_dir.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            (run_dir / "samples.jsonl").write_text(lines)
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            results.setdefault(method, {})[task_name] = summary
            runs.setdefault(method, {})[task_name] = run
            print(f"{method} {task_name}: {summary['accuracy']:.4f} (n={summary['n']})")

    table = reports.table2(results, model=args.model)
    print(reports.write_table2(table, out).read_text())
    if "prompt" in results:
        timing = reports.timing_markdown(results["prompt"])
        (out / "table3.md").write_text(timing)
        print(timing)
    confusions = {
        reports.METHOD_TITLES[method]: adapt.dispatch_confusion(runs[method])
        for method in ("prompt", "cls")
        if method in runs
    }
    if confusions:
        reports.plot_confusions(confusions, out / "confusion.png")
    if "fewshot" in runs:
        alphas = {t: run.few_shot.alpha for t, run in runs["fewshot"].items()}
        reports.plot_alpha(alphas, tuple(model.experts), out / "alpha.png")
    (out / "options.json").write_text(json.dumps(dataclasses.asdict(few_shot), indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Self-adaptation's first pass with and without the shared-prefix prefill, on the Table 3 shape:
the classification prompt (the official dispatch prompt as the system message, the request as the
user message) for requests of MATH, HumanEval and ARC-Challenge, greedy, in the same run.

    python benchmarks/shared_prefix.py [--model qwen2.5-coder-0.5b-instruct] [--requests 32]
        [--max-new-tokens 64] [--repeats 3] [--tasks math,humaneval,arc_challenge]

"plain" prefills every row's whole prompt (`SamplerConfig(min_shared_prefix=0)`); "shared"
prefills the tokens the rows share once (`t2jax.prefill.prefill_shared`, the default). Each
configuration runs once untimed to compile, then `--repeats` timed runs interleaved with the
other's; the median is printed with the speedup and how many rows produced identical tokens.
`--experts builtin` adds the likelihood dispatch (`classify(method="likelihood")`: four label
answers scored per request, 16 rows per call) in the same two configurations, with how many
requests got the same category and the largest difference of a label's log-likelihood.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from t2jax.adaptation.dispatch import classification_prompt, classify
from t2jax.adaptation.expert_model import ExpertModel, build_expert_model, load_named_experts
from t2jax.config import SamplerConfig
from t2jax.loading import LoadedModel, load_model
from t2jax.prefill import shared_prefix_length
from t2jax.sampler import Sampler
from t2jax.tasks import get_task
from t2jax.tasks.cls import ClsTask

TABLE3_TASKS = (("math", "math500"), ("humaneval", "test"), ("arc_challenge", "test"))


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict, dict]:
    """Each run once untimed (compilation), then `repeats` timed rounds, the runs interleaved in
    each: ({name: median seconds}, {name: the last result})."""
    for run in runs.values():
        run()
    times, results = {name: [] for name in runs}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, results


def likelihood_table(model: ExpertModel, args: argparse.Namespace) -> None:
    """The likelihood dispatch's first pass, plain against shared prefix, per Table 3 task."""
    plain_adapted = dataclasses.replace(
        model.adapted, sampler_config=SamplerConfig(min_shared_prefix=0)
    )
    models = {"plain": dataclasses.replace(model, adapted=plain_adapted), "shared": model}
    print("\nlikelihood dispatch (4 label answers per request, 16 rows per call)")
    print("| task | requests | plain s | shared s | speedup | same category | max |d log-lik| |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    totals = {name: 0.0 for name in models}
    for task_name, split in args.tasks:
        examples = get_task(task_name).load(split, data_dir=args.data_dir)[: args.requests]
        questions = [e.question for e in examples]
        median, dispatches = interleaved(
            {
                name: functools.partial(
                    classify, expert_model, questions, method="likelihood", rows_per_call=16
                )
                for name, expert_model in models.items()
            },
            args.repeats,
        )
        for name in models:
            totals[name] += median[name]
        plain, shared = dispatches["plain"], dispatches["shared"]
        same = sum(a == b for a, b in zip(plain.categories, shared.categories, strict=True))
        gap = float(abs(plain.label_scores - shared.label_scores).max())
        print(
            f"| {task_name} | {len(questions)} | {median['plain']:.2f} | {median['shared']:.2f} "
            f"| {median['plain'] / median['shared']:.2f}x | {same}/{len(questions)} "
            f"| {gap:.3f} |"
        )
    print(
        f"| all | | {totals['plain']:.2f} | {totals['shared']:.2f} "
        f"| {totals['plain'] / totals['shared']:.2f}x | | |"
    )


def table3_tasks(names: str) -> list[tuple[str, str]]:
    """The (task, split) pairs of TABLE3_TASKS named in the comma-separated `names`, in table
    order (the --tasks argument type)."""
    wanted = {name.strip() for name in names.split(",") if name.strip()}
    known = [name for name, _ in TABLE3_TASKS]
    unknown = sorted(wanted - set(known))
    if unknown or not wanted:
        problem = f"unknown {', '.join(unknown)}" if unknown else "no task named"
        raise argparse.ArgumentTypeError(f"{problem}; choose from {', '.join(known)}")
    return [(name, split) for name, split in TABLE3_TASKS if name in wanted]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--experts", default=None, help="NAME=PATH,... or builtin: adds the likelihood dispatch"
    )
    parser.add_argument("--skip-generate", action="store_true", help="only the likelihood table")
    parser.add_argument(
        "--tasks",
        type=table3_tasks,
        default=",".join(name for name, _ in TABLE3_TASKS),
        help="comma-separated subset of the Table 3 tasks",
    )
    args = parser.parse_args(argv)
    loaded = load_model(args.model, progress=False)
    machine = platform.processor() or platform.machine()
    print(f"{args.model}, {jax.devices()[0].platform}, {machine}")
    if not args.skip_generate:
        generate_table(loaded, args)
    if args.experts:
        experts, _ = load_named_experts(args.model, args.experts, None)
        likelihood_table(build_expert_model(loaded, experts, progress=False), args)


def generate_table(loaded: LoadedModel, args: argparse.Namespace) -> None:
    """The official generate dispatch's first pass, plain against shared prefix, per task."""
    samplers = {
        "plain": Sampler.for_model(loaded, sampler_config=SamplerConfig(min_shared_prefix=0)),
        "shared": Sampler.for_model(loaded),
    }
    print(
        "| task | requests | shared prefix | mean suffix | plain s | shared s | speedup "
        "| identical outputs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    totals = {name: 0.0 for name in samplers}
    for task_name, split in args.tasks:
        task = get_task(task_name)
        examples = task.load(split, data_dir=args.data_dir)[: args.requests]
        prompts = [classification_prompt(loaded.tokenizer, e.question) for e in examples]
        ids = samplers["plain"].encode(prompts)
        shared = shared_prefix_length(ids, SamplerConfig().min_shared_prefix)
        suffix = sum(len(i) - shared for i in ids) / len(ids)
        median, outputs = interleaved(
            {
                name: functools.partial(
                    sampler.generate,
                    prompts,
                    max_new_tokens=args.max_new_tokens,
                    stop_strings=ClsTask().stop_strings,
                )
                for name, sampler in samplers.items()
            },
            args.repeats,
        )
        for name in samplers:
            totals[name] += median[name]
        same = sum(
            a == b
            for a, b in zip(outputs["plain"].token_ids, outputs["shared"].token_ids, strict=True)
        )
        print(
            f"| {task_name} | {len(prompts)} | {shared} | {suffix:.0f} | {median['plain']:.2f} "
            f"| {median['shared']:.2f} | {median['plain'] / median['shared']:.2f}x "
            f"| {same}/{len(prompts)} |"
        )
    print(
        f"| all | | | | {totals['plain']:.2f} | {totals['shared']:.2f} "
        f"| {totals['plain'] / totals['shared']:.2f}x | |"
    )


if __name__ == "__main__":
    main()

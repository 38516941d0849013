"""`t2jax adapt`: two-pass self-adaptation of a whole batch, on a task's items or free prompts
(spec section 4; `t2jax.adaptation`).

    t2jax adapt --model smollm2-135m-instruct \\
        --experts math=math.safetensors,code=code.safetensors,reasoning=arc.safetensors \\
        --strategy prompt --task arc_challenge --limit 50
    t2jax adapt ... --strategy cls --cls-expert cls.safetensors --prompt "Write a Python function"
    t2jax adapt ... --strategy fewshot --task math --shots 10 --generations 50 --limit 200

With --task, every strategy answers the first --limit items left after taking the few-shot shots
of the split (official seeds: MATH 27, HumanEval 16, ARC-Challenge 38; other tasks: every item
unless --few-shot-seed is given), the items the few-shot strategy reports on; "fewshot" adapts on
those shots. With --prompt, the texts are answered instead (fewshot still adapts on the task).
Writes samples.jsonl, summary.json and summary.md to --out, plus confusion.png (dispatch on a
task) or alpha.png (few-shot).
"""

from __future__ import annotations

import argparse
import json
import pathlib


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `adapt` to the main parser's subparsers."""
    from t2jax.adaptation.config import add_few_shot_arguments
    from t2jax.cli.options import add_model_arguments
    from t2jax.tasks import TASK_NAMES
    from t2jax.tasks.cls import DISPATCH_METHODS

    parser = subparsers.add_parser(
        "adapt", help="two-pass self-adaptation (prompt / cls-expert dispatch, few-shot CEM)"
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--experts",
        required=True,
        help="NAME=PATH,... expert files; dispatch uses the names code, math and reasoning",
    )
    parser.add_argument("--strategy", required=True, choices=("prompt", "cls", "fewshot"))
    parser.add_argument("--cls-expert", default=None, help="the classification expert (cls)")
    source = parser.add_argument_group("requests (--task, --prompt, or both for fewshot)")
    source.add_argument("--task", choices=TASK_NAMES, default=None)
    source.add_argument("--split", default="test")
    source.add_argument("--limit", type=int, default=None, help="answer the first N items")
    source.add_argument("--data-dir", default=None, help="benchmark data (default: $T2JAX_DATA)")
    source.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="pass 2 (default: the task's, or 512)"
    )
    parser.add_argument("--classify-max-new-tokens", type=int, default=512, help="pass 1")
    parser.add_argument(
        "--dispatch",
        choices=DISPATCH_METHODS,
        default="generate",
        help="pass 1 of prompt/cls: generate and parse \\boxed{} (official) or take the most "
        "likely of the four category answers (always a valid category)",
    )
    parser.add_argument(
        "--rows-per-call", type=int, default=None, help="rows per sampler call (default: all)"
    )
    parser.add_argument(
        "--official-other",
        action="store_true",
        help="reproduce the official bug: 'other' runs with the last-loaded expert, not the base",
    )
    parser.add_argument(
        "--official-quirks", action="store_true", help="official (Llama-3) prompt rendering"
    )
    add_few_shot_arguments(parser.add_argument_group("few-shot CEM"))
    parser.add_argument("--cache-dir", default=None, help="SVD factor cache root")
    parser.add_argument("--out", default=None, help="default: runs/adapt/MODEL-STRATEGY-TASK")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_adapt)


def _check_arguments(args: argparse.Namespace) -> None:
    if args.strategy == "fewshot" and args.task is None:
        raise ValueError("--strategy fewshot needs --task (the shots come from it)")
    if args.strategy != "fewshot" and (args.task is None) == (not args.prompt):
        raise ValueError("give either --task or --prompt")
    if args.strategy == "cls" and args.cls_expert is None:
        raise ValueError("--strategy cls needs --cls-expert")


def _run_adapt(args: argparse.Namespace) -> int:
    from t2jax.adaptation import pipeline as adapt
    from t2jax.adaptation.expert_model import build_expert_model, parse_expert_paths
    from t2jax.cli.options import load_model_from_args
    from t2jax.svf import experts as experts_lib
    from t2jax.tasks import CATEGORIES, get_task

    _check_arguments(args)
    expert_paths = parse_expert_paths(args.experts)
    if args.strategy != "fewshot" and not set(expert_paths) <= set(CATEGORIES):
        raise ValueError(f"dispatch experts must be named code, math or reasoning: {expert_paths}")
    experts = {name: experts_lib.load_expert(path) for name, path in expert_paths.items()}
    classifier = experts_lib.load_expert(args.cls_expert) if args.cls_expert else None
    task = get_task(args.task) if args.task else None
    loaded = load_model_from_args(args)
    model = build_expert_model(
        loaded, experts, classifier, cache_root=args.cache_dir, progress=not args.no_progress
    )
    options = _options(args, task)
    items = task.load(args.split, data_dir=args.data_dir) if task is not None else []
    progress = not args.no_progress
    if args.prompt:
        run = _answer_prompts(model, args, task, items, options)
    else:
        run = adapt.evaluate_method(
            model, args.strategy, task, items, options, limit=args.limit, progress=progress
        )
    out = pathlib.Path(args.out or _default_out(args))
    _, summary = adapt.write_run(out, run, task if not args.prompt else None)
    _plot(out, run, args.task)
    keys = ("strategy", "task", "n", "accuracy", "first_pass_seconds", "second_pass_seconds")
    print(json.dumps({key: summary[key] for key in keys if key in summary}))
    print(f"records: {out}")
    return 0


def _answer_prompts(model, args: argparse.Namespace, task, items, options):
    """The --prompt texts (chat template) as requests; few-shot adapts on the task's shots."""
    from t2jax.adaptation import pipeline as adapt
    from t2jax.adaptation.few_shot import split_items
    from t2jax.tasks import Example, render_prompt
    from t2jax.tasks.prompts import render_chat

    tokenizer = model.adapted.tokenizer
    examples = [Example(f"prompt/{i}", text, None) for i, text in enumerate(args.prompt)]
    prompts = [render_chat(tokenizer, text) for text in args.prompt]
    shots = []
    if args.strategy == "fewshot":  # `_check_arguments` made sure there is a task
        shots = split_items(task.name, items, options.few_shot)[0]
    shot_prompts = [render_prompt(task, e, tokenizer, args.official_quirks) for e in shots]
    return adapt.adapt(
        model,
        args.strategy,
        examples,
        prompts,
        options,
        task=task,
        shots=shots,
        shot_prompts=shot_prompts,
        progress=not args.no_progress,
    )


def _options(args: argparse.Namespace, task):  # -> AdaptOptions (imported lazily)
    from t2jax.adaptation.config import AdaptOptions, few_shot_config
    from t2jax.tasks import OFFICIAL_STOP_STRINGS

    default_tokens = task.max_new_tokens if task is not None else 512
    return AdaptOptions(
        max_new_tokens=args.max_new_tokens or default_tokens,
        stop_strings=tuple(task.stop_strings) if task is not None else OFFICIAL_STOP_STRINGS,
        rows_per_call=args.rows_per_call,
        classify_max_new_tokens=args.classify_max_new_tokens,
        dispatch=args.dispatch,
        official_other=args.official_other,
        official_quirks=args.official_quirks,
        few_shot=few_shot_config(args),
    )


def _default_out(args: argparse.Namespace) -> str:
    model_name = pathlib.Path(args.model).name.removesuffix(".gguf")
    return f"runs/adapt/{model_name}-{args.strategy}-{args.task or 'prompts'}"


def _plot(out: pathlib.Path, run, task_name: str | None) -> None:
    """confusion.png for dispatch on a task of known category, alpha.png for few-shot."""
    from t2jax import reports
    from t2jax.adaptation.dispatch import CATEGORY_OF_TASK, dispatch_confusion

    if run.dispatch is not None and task_name in CATEGORY_OF_TASK:
        counts = dispatch_confusion({task_name: run.dispatch.categories})
        reports.plot_confusions({run.strategy: counts}, out / "confusion.png")
    if run.few_shot is not None:
        alphas = {task_name: run.few_shot.alpha}
        reports.plot_alpha(alphas, run.few_shot.experts, out / "alpha.png")

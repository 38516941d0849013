"""`t2jax generate` and `t2jax eval`: text from a model, and its accuracy on a benchmark task.

    t2jax generate --model smollm2-135m-instruct --chat --prompt "What is 7 * 8?"
    t2jax eval --model smollm2-135m-instruct --task gsm8k --split test --limit 20

`register` adds both commands to the main parser; each sets `func(args) -> int` (exit status).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from t2jax.cli.options import add_model_arguments, load_model_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `generate` and `eval` to `subparsers` (from `ArgumentParser.add_subparsers`)."""
    _register_generate(subparsers)
    _register_eval(subparsers)


def _register_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text with a model")
    add_model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON record per prompt")
    parser.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from t2jax.sampler import Sampler
    from t2jax.tasks.prompts import render_chat

    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be at least 1")
    loaded = load_model_from_args(args)
    prompts = args.prompt
    if args.chat:
        prompts = [render_chat(loaded.tokenizer, prompt, args.system) for prompt in prompts]
    generation = Sampler.for_model(loaded).generate(
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop_strings=args.stop,
        seed=args.seed,
    )
    for prompt, text, reason, ids in zip(
        args.prompt, generation.texts, generation.finish_reasons, generation.token_ids, strict=True
    ):
        if args.json:
            record = {"prompt": prompt, "output": text, "finish_reason": reason, "tokens": len(ids)}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(text)
    return 0


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    from t2jax.tasks import TASK_NAMES

    parser = subparsers.add_parser("eval", help="evaluate a model on a benchmark task")
    add_model_arguments(parser)
    parser.add_argument("--task", required=True, choices=TASK_NAMES)
    parser.add_argument("--split", default="test", help="e.g. train, valid, test, math500")
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--limit", type=int, default=None, help="first N items of the split")
    subset.add_argument(
        "--sample", type=int, default=None, help="a seeded random subset of N items (see --seed)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="override the task's official budget"
    )
    parser.add_argument("--data-dir", default=None, help="benchmark data (default: $T2JAX_DATA)")
    parser.add_argument(
        "--out", default=None, help="output dir (default: runs/eval/MODEL-TASK-SPLIT)"
    )
    parser.add_argument(
        "--official-quirks",
        action="store_true",
        help="render prompts exactly as the official code (Llama-3 double BOS, CoT suffix, ...)",
    )
    parser.add_argument("--no-resume", action="store_true", help="discard earlier records")
    parser.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from t2jax.evaluation import evaluate_model, subsample
    from t2jax.sampler import Sampler
    from t2jax.tasks import get_task

    task = get_task(args.task)
    examples = task.load(args.split, data_dir=args.data_dir)
    if args.limit is not None:
        examples = examples[: args.limit]
    if args.sample is not None:
        examples = subsample(examples, args.sample, args.seed)
    loaded = load_model_from_args(args)
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    model_name = pathlib.Path(args.model).name.removesuffix(".gguf")
    out = args.out or f"runs/eval/{model_name}-{args.task}-{args.split}"
    config = {
        "model": args.model,
        "split": args.split,
        "limit": args.limit,
        "sample": args.sample,
        "seed": args.seed,
        "max_new_tokens": max_new_tokens,
        "official_quirks": args.official_quirks,
    }
    summary = evaluate_model(
        Sampler.for_model(loaded),
        task,
        examples,
        out,
        args.batch_size,
        max_new_tokens,
        official_quirks=args.official_quirks,
        config=config,
        resume=not args.no_resume,
    )
    print(json.dumps({key: summary[key] for key in ("task", "n", "accuracy", "standard_error")}))
    print(f"records: {out}")
    return 0

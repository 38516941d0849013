"""The `t2jax` command line.

Examples:
  t2jax generate --model smollm2-135m-instruct --chat --prompt "What is 7 * 8?"
  t2jax eval --model smollm2-135m-instruct --task gsm8k --split test --limit 20
  t2jax decompose --model smollm2-135m-instruct
  t2jax expert info math.safetensors
  t2jax params --model smollm2-135m-instruct --targets mlp
  t2jax plan --model Llama-3-8B-Instruct --topology v5e-4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from collections.abc import Sequence

from t2jax.cli import adapt as adapt_cli
from t2jax.cli import svf as svf_cli
from t2jax.cli import train as train_cli
from t2jax.config import MeshConfig
from t2jax.tasks.sandbox import ISOLATION_ENV, ISOLATION_MODES


def _mesh_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"mesh shape must look like '-1,1,1', got {text!r}"
        ) from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --model, --dtype and --mesh (shared by every command that loads a model)."""
    parser.add_argument(
        "--model",
        required=True,
        help="registry name (e.g. smollm2-135m-instruct), .gguf file, HF directory or hub id",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="parameter dtype (default: bfloat16; activations stay float32 on CPU)",
    )
    parser.add_argument(
        "--mesh",
        type=_mesh_shape,
        default=None,
        help="mesh shape over axes data,fsdp,tensor; -1 takes the remaining devices (default: "
        "all data-parallel, FSDP on accelerators when the weights do not fit a chip)",
    )


def load_model_from_args(args: argparse.Namespace):
    """Loads the model named by `add_model_arguments` options, with a progress bar."""
    import jax.numpy as jnp

    from t2jax.loading import load_model

    dtype = None if args.dtype is None else jnp.dtype(args.dtype)
    return load_model(args.model, dtype=dtype, mesh_config=MeshConfig(shape=args.mesh))


def _add_generate(subparsers) -> None:
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


def render_chat(tokenizer, user: str, system: str | None = None) -> str:
    """The user (and optional system) message rendered with the model's chat template."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _run_generate(args: argparse.Namespace) -> int:
    from t2jax.sampler import Sampler

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


def _add_eval(subparsers) -> None:
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
    from t2jax.evaluation import evaluate, subsample
    from t2jax.sampler import Sampler
    from t2jax.tasks import get_task

    task = get_task(args.task)
    examples = task.load(args.split, data_dir=args.data_dir)
    if args.limit is not None:
        examples = examples[: args.limit]
    if args.sample is not None:
        examples = subsample(examples, args.sample, args.seed)
    loaded = load_model_from_args(args)
    sampler = Sampler.for_model(loaded)
    max_new_tokens = args.max_new_tokens or task.max_new_tokens

    def generate(prompts: list[str]) -> list[str]:
        generation = sampler.generate(
            prompts, max_new_tokens=max_new_tokens, stop_strings=task.stop_strings
        )
        return generation.texts

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
    summary = evaluate(
        task,
        examples,
        generate,
        out,
        args.batch_size,
        tokenizer=loaded.tokenizer,
        official_quirks=args.official_quirks,
        config=config,
        resume=not args.no_resume,
    )
    print(json.dumps({key: summary[key] for key in ("task", "n", "accuracy", "standard_error")}))
    print(f"records: {out}")
    return 0


def _add_plan(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="compile the programs for a TPU topology from any host: per-device memory and the "
        "mesh / RL microbatch / remat that fit (needs the aot extra)",
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="paper model (Llama-3-8B-Instruct, Llama-3-70B-Instruct, Mistral-7B-Instruct-v0.3, "
        "Qwen2.5-7B-Instruct: no weights needed), registry name, HF directory or hub id; "
        "repeatable",
    )
    parser.add_argument(
        "--topology", action="append", required=True, help="v5e-4, v5e-8, v5p-8, ...; repeatable"
    )
    parser.add_argument("--mesh", type=_mesh_shape, default=None, help="check this mesh instead")
    parser.add_argument("--batch", type=int, default=32, help="decode rows")
    parser.add_argument("--prompt-length", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--rl-batch", type=int, default=256, help="rows of an RL step")
    parser.add_argument("--rl-sequence", type=int, default=1024, help="tokens per RL row")
    parser.add_argument("--targets", default="mlp")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--microbatch", type=int, default=None, help="check this RL microbatch")
    parser.add_argument(
        "--remat", choices=("on", "off"), default=None, help="with --microbatch (default on)"
    )
    parser.add_argument(
        "--programs",
        default=None,
        help="comma-separated subset of prefill,decode,factored_decode,"
        "merge,rl_merged,rl_factored (default: all)",
    )
    parser.add_argument("--out", default="plan.json", help="JSON file of every plan")
    parser.add_argument("--table", action="store_true", help="print a Markdown table at the end")
    parser.set_defaults(func=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from t2jax.plan import search as plan

    workload = plan.Workload(
        batch=args.batch,
        prompt_length=args.prompt_length,
        max_new_tokens=args.max_new_tokens,
        rl_batch=args.rl_batch,
        rl_sequence=args.rl_sequence,
        targets=args.targets,
        dtype=args.dtype,
    )
    memory = None
    if args.microbatch is not None:
        memory = plan.RLMemory(args.microbatch, args.remat != "off")
    programs = plan.PROGRAMS if args.programs is None else tuple(args.programs.split(","))
    plans = []
    for model in args.model:
        for topology in args.topology:
            print(f"== {model} on {topology}", flush=True)
            result = plan.plan(
                model,
                topology,
                workload,
                mesh_shape=args.mesh,
                rl_memory=memory,
                programs=programs,
                log=lambda line: print(line, flush=True),
            )
            print(
                f"mesh {result['mesh']}  RL microbatch {result['rl']['microbatch_size']} "
                f"remat {result['rl']['remat']}  fits: {result['fits']}",
                flush=True,
            )
            plans.append(result)
            plan.write_plan(plans, args.out)
    if args.table:
        print(plan.scaling_table(plans))
    print(f"plan: {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="t2jax", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--sandbox",
        choices=ISOLATION_MODES,
        default=None,
        help="isolation of model-written code (default: $T2JAX_SANDBOX, else auto); "
        "strict refuses to run without Landlock, seccomp and (as root) a dropped uid",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_eval(subparsers)
    svf_cli.register(subparsers)
    train_cli.register(subparsers)
    adapt_cli.register(subparsers)
    _add_plan(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `t2jax` console script."""
    args = build_parser().parse_args(argv)
    if args.sandbox is not None:
        os.environ[ISOLATION_ENV] = args.sandbox  # read by every sandbox the command starts
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"t2jax {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

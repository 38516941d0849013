"""`t2jax plan`: compile the programs for a TPU topology from any host (needs the aot extra).

    t2jax plan --model Llama-3-8B-Instruct --topology v5e-4 --table

Prints each compiled program's per-device memory and the mesh / RL microbatch / remat that fit,
and writes every plan to --out (`t2jax.plan.search`). `register` adds the command.
"""

from __future__ import annotations

import argparse

from t2jax.cli.options import mesh_shape


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `plan` to `subparsers` (from `ArgumentParser.add_subparsers`)."""
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
    parser.add_argument("--mesh", type=mesh_shape, default=None, help="check this mesh instead")
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
    # Imported here: the programs pull in the sampler and the RL trainer.
    from t2jax.plan import programs as plan_programs
    from t2jax.plan import rules as plan_rules
    from t2jax.plan import search as plan_search

    workload = plan_programs.Workload(
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
        memory = plan_rules.RLMemory(args.microbatch, args.remat != "off")
    programs = plan_programs.PROGRAMS if args.programs is None else tuple(args.programs.split(","))
    plans = []
    for model in args.model:
        for topology in args.topology:
            print(f"== {model} on {topology}", flush=True)
            result = plan_search.plan(
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
            plan_search.write_plan(plans, args.out)
    if args.table:
        print(plan_search.scaling_table(plans))
    print(f"plan: {args.out}")
    return 0

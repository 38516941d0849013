"""`t2jax plan`: compile the programs for a TPU or GPU topology from any host (needs the aot
extra).

    t2jax plan --model Llama-3-8B-Instruct --topology v5e-4 --table

Prints each compiled program's per-device memory and the mesh / rows per call / RL microbatch /
remat that fit, and writes every plan to --out (`t2jax.plan.search`). `register` adds the command.
"""

from __future__ import annotations

import argparse

from t2jax.cli.options import mesh_shape
from t2jax.plan.hardware import TOPOLOGIES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `plan` to `subparsers` (from `ArgumentParser.add_subparsers`)."""
    parser = subparsers.add_parser(
        "plan",
        help="compile the programs for a TPU or GPU topology from any host: per-device memory "
        "and the mesh / rows per call / RL microbatch / remat that fit (needs the aot extra)",
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
        "--topology",
        action="append",
        required=True,
        help=f"one of {', '.join(TOPOLOGIES)}; repeatable",
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
            print(_verdict(result), flush=True)
            plans.append(result)
            plan_search.write_plan(plans, args.out)
    if args.table:
        print(plan_search.scaling_table(plans))
    print(f"plan: {args.out}")
    return 0


def _verdict(result: dict) -> str:
    """The settings a plan chose, or that nothing it tried fits."""
    rows = result["workload"]["batch"]
    settings = (
        f"mesh {result['mesh']}, {rows} rows per sampler call, RL microbatch "
        f"{result['rl']['microbatch_size']}, remat {result['rl']['remat']}"
    )
    if result["fits"]:
        return f"fits with {settings}"
    last_tries = {program["program"]: program for program in result["programs"]}
    failed = sorted(name for name, program in last_tries.items() if not program["fits"])
    if result["weights_per_chip_gib"] > result["usable_gib"]:
        return (
            f"DOES NOT FIT: the weights alone take {result['weights_per_chip_gib']} GiB per chip "
            f"sharded over all {result['devices']} (usable: {result['usable_gib']}); use more or "
            "larger chips"
        )
    return (
        f"DOES NOT FIT: {', '.join(failed)} exceed the memory with every setting tried (last: "
        f"{settings}); use more or larger chips, shorter sequences or fewer rows"
    )

"""The `t2jax` command line.

Examples:
  t2jax generate --model smollm2-135m-instruct --chat --prompt "What is 7 * 8?"
  t2jax eval --model smollm2-135m-instruct --task gsm8k --split test --limit 20
  t2jax decompose --model smollm2-135m-instruct
  t2jax expert info math.safetensors
  t2jax params --model smollm2-135m-instruct --targets mlp
  t2jax plan --model Llama-3-8B-Instruct --topology v5e-4

One module per command group registers its subcommands (`register(subparsers)`): `infer`
(generate, eval), `svf` (decompose, params, expert), `train` (train, sweep), `adapt` and `plan`;
`options` holds the options they share.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from t2jax.cli import adapt as adapt_cli
from t2jax.cli import export as export_cli
from t2jax.cli import infer as infer_cli
from t2jax.cli import plan as plan_cli
from t2jax.cli import svf as svf_cli
from t2jax.cli import train as train_cli
from t2jax.tasks.sandbox import ISOLATION_ENV, ISOLATION_MODES


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
    for commands in (infer_cli, svf_cli, train_cli, adapt_cli, plan_cli, export_cli):
        commands.register(subparsers)
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

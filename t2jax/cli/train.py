"""`t2jax train` and `t2jax sweep`: SVF expert training from a config file with dotted overrides.

    t2jax train --config=experiments/configs/svf.py:model=smollm2-135m-instruct,task=arc_easy \
        --config.rl.lr=1e-3 --config.run.workdir=runs/arc
    t2jax sweep experiments/sweeps/paper_kl.py --root runs/sweeps/kl [--dry-run]

Every leaf of `t2jax.rl.config.TrainConfig` is an option `--config.SECTION.FIELD` (listed by
`t2jax train --help`), parsed by the field's type; the same overrides work with absl through
`experiments/train_svf.py`. `register` adds both commands to the main parser.
"""

from __future__ import annotations

import argparse
import json

from t2jax import configuration, parallel
from t2jax.cli.options import add_config_arguments, overrides_from_args
from t2jax.rl import config as rl_config


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `train` and `sweep` to `subparsers` (from `ArgumentParser.add_subparsers`)."""
    train = subparsers.add_parser(
        "train", help="train an SVF expert with REINFORCE (resumes a run in the same workdir)"
    )
    add_config_arguments(
        train, rl_config.TrainConfig, "experiments/configs/svf.py:task=gsm8k", required=True
    )
    train.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (also done when T2JAX_DISTRIBUTED=1 or a "
        "cluster is detected)",
    )
    train.set_defaults(func=_run_train)

    sweep = subparsers.add_parser("sweep", help="run the grid of a sweep file (resumable)")
    sweep.add_argument("file", help="sweep module defining CONFIG and sweep()")
    sweep.add_argument("--root", required=True, help="directory of the runs and manifest.jsonl")
    sweep.add_argument(
        "--dry-run", action="store_true", help="validate the configs and write the manifest only"
    )
    sweep.set_defaults(func=_run_sweep)


def _run_train(args: argparse.Namespace) -> int:
    parallel.maybe_initialize_distributed(force=args.distributed)
    from t2jax.rl.trainer import train

    config = configuration.resolve_config(
        rl_config.TrainConfig, args.config, overrides_from_args(args)
    )
    summary = train(config)
    if parallel.is_main_process():
        print(json.dumps(summary, indent=2))
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from t2jax.sweeps import run_sweep

    records = run_sweep(args.file, args.root, dry_run=args.dry_run)
    for record in records:
        print(f"{record['status']:9} {record['name']}: {record['command']}")
    return 1 if any(record["status"] == "failed" for record in records) else 0

"""`t2jax adapt`: two-pass self-adaptation of a whole batch, on a task's items or free prompts
(spec section 4; `t2jax.adaptation`).

    t2jax adapt --model smollm2-135m-instruct \\
        --experts math=math.safetensors,code=code.safetensors,reasoning=arc.safetensors \\
        --strategy prompt --task arc_challenge --limit 50
    t2jax adapt ... --strategy cls --cls-expert cls.safetensors --prompt "Write a Python function"
    t2jax adapt ... --strategy fewshot --task math --shots 10 --generations 50 --limit 200
    t2jax adapt --config=experiments/configs/adapt.py:strategy=fewshot \\
        --config.options.few_shot.generations=2

The flags and `--config` build one `t2jax.adaptation.config.AdaptConfig` (the config file or the
defaults, then the flags given, then the `--config.PATH=VALUE` overrides), which
`t2jax.adaptation.run.run_adapt` runs. With --task, every strategy answers the first --limit items
left after taking the few-shot shots of the split (official seeds: MATH 27, HumanEval 16,
ARC-Challenge 38; other tasks: every item unless --few-shot-seed is given), the items the few-shot
strategy reports on; "fewshot" adapts on those shots. With --prompt, the texts are answered instead
(fewshot still adapts on the task). Writes samples.jsonl, summary.json and summary.md to --out,
plus confusion.png (dispatch on a task) or alpha.png (few-shot); --compare-base also answers the
items with the base weights (--out/base/) and prints both answers of every item (comparison.md).
"""

from __future__ import annotations

import argparse
import json

# Flag (argparse dest) -> the AdaptConfig path it sets; flags left out keep the config's value.
FLAG_PATHS = {
    "model": "model.name",
    "dtype": "model.dtype",
    "mesh": "model.mesh.shape",
    "experts": "experts",
    "strategy": "strategy",
    "cls_expert": "cls_expert",
    "cache_dir": "cache_dir",
    "compare_base": "compare_base",
    "task": "requests.task",
    "split": "requests.split",
    "limit": "requests.limit",
    "data_dir": "requests.data_dir",
    "prompt": "requests.prompts",
    "max_new_tokens": "options.max_new_tokens",
    "classify_max_new_tokens": "options.classify_max_new_tokens",
    "dispatch": "options.dispatch",
    "rows_per_call": "options.rows_per_call",
    "official_other": "options.official_other",
    "official_quirks": "options.official_quirks",
    "out": "run.workdir",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `adapt` to the main parser's subparsers."""
    from t2jax.adaptation.config import AdaptConfig, add_few_shot_arguments
    from t2jax.cli.options import add_config_arguments, add_model_arguments
    from t2jax.tasks import TASK_NAMES
    from t2jax.tasks.cls import DISPATCH_METHODS

    parser = subparsers.add_parser(
        "adapt", help="two-pass self-adaptation (prompt / cls-expert dispatch, few-shot CEM)"
    )
    add_config_arguments(parser, AdaptConfig, "experiments/configs/adapt.py", required=False)
    add_model_arguments(parser, required=False)
    parser.add_argument(
        "--experts",
        help="NAME=PATH,... expert files; dispatch uses the names code, math and reasoning",
    )
    parser.add_argument("--strategy", choices=("prompt", "cls", "fewshot"))
    parser.add_argument("--cls-expert", help="the classification expert (cls), or 'builtin'")
    source = parser.add_argument_group("requests (--task, --prompt, or both for fewshot)")
    source.add_argument("--task", choices=TASK_NAMES)
    source.add_argument("--split", help="the task's split (default: test)")
    source.add_argument("--limit", type=int, help="answer the first N items")
    source.add_argument("--data-dir", help="benchmark data (default: $T2JAX_DATA)")
    source.add_argument("--prompt", action="append", help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, help="pass 2 (default: the task's, or 512)")
    parser.add_argument("--classify-max-new-tokens", type=int, help="pass 1 (default: 512)")
    parser.add_argument(
        "--dispatch",
        choices=DISPATCH_METHODS,
        help="pass 1 of prompt/cls: generate and parse \\boxed{} (official, the default), take "
        "the most likely of the four category answers (likelihood; always a valid category), or "
        "that likelihood less its value after content-free questions (calibrated)",
    )
    parser.add_argument("--rows-per-call", type=int, help="rows per sampler call (default: all)")
    parser.add_argument(
        "--official-other",
        action="store_const",
        const=True,
        help="reproduce the official bug: 'other' runs with the last-loaded expert, not the base",
    )
    parser.add_argument(
        "--official-quirks",
        action="store_const",
        const=True,
        help="official (Llama-3) prompt rendering",
    )
    add_few_shot_arguments(parser.add_argument_group("few-shot CEM"))
    parser.add_argument(
        "--compare-base",
        action="store_const",
        const=True,
        help="also answer the items with the base weights and print both, item by item",
    )
    parser.add_argument("--cache-dir", help="SVD factor cache root")
    parser.add_argument("--out", help="default: runs/adapt/MODEL-STRATEGY-TASK")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_run_adapt)


def adapt_config(args: argparse.Namespace):  # -> AdaptConfig (imported lazily)
    """The run config of the command line: the --config file (or the defaults), then the flags
    given, then the --config.PATH overrides.

    Raises:
        ConfigError: a bad value, or settings that do not make a run.
    """
    from t2jax import configuration
    from t2jax.adaptation.config import AdaptConfig, few_shot_overrides
    from t2jax.cli.options import overrides_from_args

    config = AdaptConfig()
    if args.config is not None:
        config = configuration.from_config_dict(
            AdaptConfig, configuration.load_config_file(args.config)
        )
    flags = {path: getattr(args, dest) for dest, path in FLAG_PATHS.items()}
    flags = {path: value for path, value in flags.items() if value is not None}
    few_shot = {f"options.few_shot.{k}": v for k, v in few_shot_overrides(args).items()}
    if args.no_progress:
        flags["run.progress"] = False
    overrides = {**flags, **few_shot, **overrides_from_args(args)}
    return configuration.with_overrides(config, overrides).validate()


def _run_adapt(args: argparse.Namespace) -> int:
    from t2jax.adaptation.run import COMPARISON_FILE, run_adapt, run_directory

    config = adapt_config(args)
    summary = run_adapt(config)
    keys = ("strategy", "task", "n", "accuracy", "first_pass_seconds", "second_pass_seconds")
    print(json.dumps({key: summary[key] for key in keys if key in summary}))
    if config.compare_base:
        print((run_directory(config) / COMPARISON_FILE).read_text(), end="")
    print(f"records: {run_directory(config)}")
    return 0

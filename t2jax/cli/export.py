"""`t2jax export`: a model with an SVF expert merged into its weights, as a Hugging Face checkpoint.

    t2jax export --model smollm2-135m-instruct --expert math.safetensors --out smollm2-math
    t2jax export --model qwen2.5-coder-0.5b-instruct --out qwen-base --dtype float32
    t2jax export --model qwen2.5-coder-0.5b-instruct --out qwen-arch --architecture-only

`--architecture-only` writes config.json, generation_config.json and the tokenizer without weights:
`--model random:qwen-arch` then loads that architecture with random weights (for benchmarks on
machines the weights cannot reach).

The model is loaded and W' composed in float32; `--dtype` is the dtype of the saved weights.
"""

from __future__ import annotations

import argparse
import pathlib

from t2jax import files
from t2jax.cli import options
from t2jax.config import MeshConfig, ModelSection


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `export` to `subparsers` (from `ArgumentParser.add_subparsers`)."""
    parser = subparsers.add_parser(
        "export",
        help="write a model with an SVF expert merged into its weights as an HF checkpoint",
    )
    options.add_model_arguments(parser, dtype=False)  # it always loads in float32
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="bfloat16",
        help="dtype of the saved weights (default: bfloat16; loading and merging run in float32)",
    )
    parser.add_argument(
        "--expert",
        default=None,
        help="expert file or orbax directory; omit to export the base model",
    )
    parser.add_argument("--out", required=True, help="the checkpoint directory to create")
    parser.add_argument(
        "--architecture-only",
        action="store_true",
        help="write the config and tokenizer without weights (load it back as random:OUT)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="SVD factors are cached under CACHE_DIR/<fingerprint> (default: the user cache dir)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from t2jax import export
    from t2jax.checkpoints import load_checkpoint
    from t2jax.loading import load_model_section
    from t2jax.svf import experts as experts_lib

    out = pathlib.Path(args.out)
    files.check_destination(out, args.overwrite)  # before any loading
    if args.architecture_only:
        if args.expert:
            raise SystemExit("--architecture-only writes no weights: drop --expert")
        checkpoint = load_checkpoint(args.model, progress=not args.no_progress)
        export.export_architecture(checkpoint, out, overwrite=args.overwrite)
        print(f"wrote {out}: the architecture and tokenizer of {args.model}, no weights")
        return 0
    expert = experts_lib.load_expert(args.expert) if args.expert else None
    section = ModelSection(name=args.model, dtype="float32", mesh=MeshConfig(shape=args.mesh))
    loaded = load_model_section(section, progress=not args.no_progress)
    export.export_expert(
        loaded,
        expert,
        out,
        dtype=args.dtype,
        overwrite=args.overwrite,
        cache_root=args.cache_dir,
        progress=not args.no_progress,
    )
    what = f"{args.model} + expert {args.expert}" if expert else f"{args.model} (base model)"
    size = (out / export.WEIGHTS_FILE).stat().st_size / 2**20
    print(f"wrote {out}: {what}, {args.dtype} weights, {size:.1f} MiB")
    return 0

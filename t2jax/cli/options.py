"""Options shared by the `t2jax` commands: the model to load (--model, --dtype, --mesh) and the
mesh-shape argument type."""

from __future__ import annotations

import argparse

from t2jax.config import MeshConfig


def mesh_shape(text: str) -> tuple[int, ...]:
    """The argparse type of --mesh: "-1,1,1" -> (-1, 1, 1)."""
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
        type=mesh_shape,
        default=None,
        help="mesh shape over axes data,fsdp,tensor; -1 takes the remaining devices (default: "
        "all data-parallel, FSDP on accelerators when the weights do not fit a chip)",
    )


def load_model_from_args(args: argparse.Namespace):  # -> t2jax.loading.LoadedModel
    """Loads the model named by `add_model_arguments` options, with a progress bar."""
    import jax.numpy as jnp

    from t2jax.loading import load_model

    dtype = None if args.dtype is None else jnp.dtype(args.dtype)
    return load_model(args.model, dtype=dtype, mesh_config=MeshConfig(shape=args.mesh))

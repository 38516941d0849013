"""Options shared by the `t2jax` commands: the model to load (--model, --dtype, --mesh), the
mesh-shape argument type, and a run config given as a file plus dotted overrides (--config=FILE:ARG
--config.SECTION.FIELD=VALUE, one option per leaf of the config dataclass)."""

from __future__ import annotations

import argparse
import types
import typing

from t2jax import configuration
from t2jax.config import MeshConfig, ModelSection

_OVERRIDE_PREFIX = "config_override:"


def mesh_shape(text: str) -> tuple[int, ...]:
    """The argparse type of --mesh: "-1,1,1" -> (-1, 1, 1)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"mesh shape must look like '-1,1,1', got {text!r}"
        ) from None


def add_model_arguments(
    parser: argparse.ArgumentParser, required: bool = True, *, dtype: bool = True
) -> None:
    """Adds --model, --dtype (unless `dtype` is False) and --mesh (shared by every command that
    loads a model)."""
    parser.add_argument(
        "--model",
        required=required,
        help="registry name (e.g. smollm2-135m-instruct), .gguf file, HF directory or hub id",
    )
    if dtype:
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
    from t2jax.loading import load_model_section

    return load_model_section(model_section(args))


def model_section(args: argparse.Namespace) -> ModelSection:
    """The model section of a run config from `add_model_arguments` options."""
    return ModelSection(name=args.model, dtype=args.dtype, mesh=MeshConfig(shape=args.mesh))


def add_config_arguments(
    parser: argparse.ArgumentParser, config_class: type, example: str, *, required: bool
) -> None:
    """Adds --config (a Python config file "path.py[:arg]", see `configuration.load_config_file`)
    and one --config.PATH option per leaf of `config_class`, parsed by the field's type."""
    parser.add_argument(
        "--config", required=required, help=f"config file and its argument, e.g. {example}"
    )
    for path, annotation in configuration.leaf_types(config_class).items():
        parser.add_argument(
            f"--config.{path}",
            dest=_OVERRIDE_PREFIX + path,
            default=None,
            metavar=_metavar(annotation),
        )


def _metavar(annotation) -> str:
    """How a field's values are written: INT, FLOAT|NONE, INT,INT,..., sigmoid|plain."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin is tuple:
        return f"{_metavar(args[0])},..."
    if origin in (typing.Union, types.UnionType):
        return "|".join(_metavar(arg) for arg in args if arg is not type(None)) + "|NONE"
    return annotation.__name__.upper()


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The `--config.KEY=VALUE` options given on the command line, as {KEY: VALUE}."""
    return {
        name.removeprefix(_OVERRIDE_PREFIX): value
        for name, value in vars(args).items()
        if name.startswith(_OVERRIDE_PREFIX) and value is not None
    }

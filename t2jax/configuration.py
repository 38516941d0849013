"""The one configuration library of t2jax: run settings are frozen dataclasses whose fields are
typed (choices as `typing.Literal`), nested one section per concern, and converted here to and
from plain dicts (JSON), `ml_collections.ConfigDict` (Python config files, absl flags) and dotted
overrides ("rl.lr=1e-3", "few_shot.generations=2"). Training (`t2jax.rl.config.TrainConfig`) and
adaptation (`t2jax.adaptation.config.AdaptConfig`) use the same functions, so a sweep varies either.

    config = resolve_config(TrainConfig, "experiments/configs/svf.py:task=gsm8k", {"rl.lr": "1e-3"})

Validation: every conversion checks keys, types and `Literal` choices (`ConfigError` naming the
dotted path); sections call `check_choices(self)` in `__post_init__` so that direct construction
is checked too, and add their own range checks.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import ml_collections
from ml_collections import config_dict

Config = TypeVar("Config")


class ConfigError(ValueError):
    """An invalid configuration: a model config t2jax cannot run faithfully, or run settings
    (loading, mesh, training, adaptation, sweeps) that are unknown, mistyped or do not fit
    together."""


def require(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def check_choices(config: Any, section: str = "") -> None:
    """Checks every `Literal`-typed field (and optional `Literal` field) of a config dataclass.

    Raises:
        ConfigError: "section.field='x' is not one of 'a', 'b'".
    """
    for name, annotation in field_types(type(config)).items():
        choices = literal_choices(annotation)
        value = getattr(config, name)
        if choices is not None and value not in choices:
            path = f"{section}.{name}" if section else name
            raise ConfigError(f"{path}={value!r} is not one of {', '.join(map(repr, choices))}")


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of `Literal[...]` or `Literal[...] | None` (None included), else None."""
    inner = optional_inner(annotation)
    if inner is not None:
        choices = literal_choices(inner)
        return None if choices is None else (*choices, None)
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return None


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def optional_inner(annotation: Any) -> Any:
    """X for `X | None`, else None."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return inner[0] if len(inner) == 1 else None


# ----------------------------------------------------------------------------------------------
# Dicts.


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a config dataclass (tuples become lists)."""
    return _jsonable(dataclasses.asdict(config))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def from_dict(cls: type[Config], values: Mapping[str, Any], path: str = "") -> Config:
    """Builds config dataclass `cls` from a nested mapping; missing keys keep their defaults.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or not among a field's choices.
    """
    hints = field_types(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(path + key for key in unknown)}; "
            f"{path or 'the config'} has {', '.join(sorted(hints))}"
        )
    return cls(**{key: _coerce(value, hints[key], path + key) for key, value in values.items()})


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """`value` converted to `annotation` (dataclass, Optional, tuple, Literal, float, int, bool,
    str)."""
    if dataclasses.is_dataclass(annotation):
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return from_dict(annotation, value, path + ".")
    inner = optional_inner(annotation)
    if inner is not None:
        return None if value is None else _coerce(value, inner, path)
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a sequence, got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(item, item_type, path) for item in value)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{path}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    return _coerce_scalar(value, annotation, path)


def _coerce_scalar(value: Any, annotation: Any, path: str) -> Any:
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation in (int, str) and isinstance(value, annotation) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{path} must be {annotation.__name__}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# Dotted overrides.


def leaf_types(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> type annotation of every leaf field ("rl.lr" -> float)."""
    leaves = {}
    for name, annotation in field_types(cls).items():
        if dataclasses.is_dataclass(annotation):
            leaves.update(leaf_types(annotation, f"{prefix}{name}."))
        else:
            leaves[prefix + name] = annotation
    return leaves


def parse_value(text: str, annotation: Any, path: str = "value") -> Any:
    """Parses a command-line string into `annotation`: "none"/"null" for optional fields,
    "true"/"false" for booleans, "1,2" or "(1, 2)" for tuples.

    Raises:
        ConfigError: the text does not parse as that type.
    """
    inner = optional_inner(annotation)
    if inner is not None:
        return None if text.strip().lower() in ("none", "null") else parse_value(text, inner, path)
    if typing.get_origin(annotation) is tuple:
        item_type = typing.get_args(annotation)[0]
        items = [item.strip() for item in text.strip().strip("()[]").split(",") if item.strip()]
        return tuple(parse_value(item, item_type, path) for item in items)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{path} must be true or false, got {text!r}")
        return lowered in ("true", "1", "yes")
    if typing.get_origin(annotation) is Literal:
        return text
    try:
        return annotation(text) if annotation in (int, float) else text
    except ValueError:
        raise ConfigError(f"{path} must be {annotation.__name__}, got {text!r}") from None


def with_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """`config` with dotted-path overrides ({"rl.lr": 1e-3} or {"rl.lr": "1e-3"}) applied; string
    values are parsed by the field's type.

    Raises:
        ConfigError: an unknown path or a bad value.
    """
    leaves = leaf_types(type(config))
    values = to_dict(config)
    for path, value in overrides.items():
        if path not in leaves:
            raise ConfigError(f"unknown config key {path!r}; known keys: {', '.join(leaves)}")
        if isinstance(value, str) and leaves[path] is not str:
            value = parse_value(value, leaves[path], path)
        *parents, leaf = path.split(".")
        node = values
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return from_dict(type(config), values)


# ----------------------------------------------------------------------------------------------
# ConfigDict and config files ("path.py" or "path.py:arg", as `ml_collections.config_flags` reads
# them).


def to_config_dict(config: Any) -> ml_collections.ConfigDict:
    """A `ConfigDict` of `config` for config files and `ml_collections.config_flags`: optional
    fields left at None become typed placeholders, so `--config.task.valid_limit=100` works."""
    return ml_collections.ConfigDict(_config_dict_values(config))


def _config_dict_values(config: Any) -> dict[str, Any]:
    values = {}
    for name, annotation in field_types(type(config)).items():
        value = getattr(config, name)
        inner = optional_inner(annotation)
        if dataclasses.is_dataclass(value):
            values[name] = _config_dict_values(value)
        elif value is None and inner is not None:
            placeholder = str if typing.get_origin(inner) is Literal else inner
            values[name] = config_dict.placeholder(typing.get_origin(placeholder) or placeholder)
        else:
            values[name] = value
    return values


def from_config_dict(
    cls: type[Config], values: ml_collections.ConfigDict | Mapping[str, Any]
) -> Config:
    """The validated `cls` config of a `ConfigDict` (or plain nested mapping)."""
    if isinstance(values, ml_collections.ConfigDict):
        values = values.to_dict()
    return from_dict(cls, values)


def load_python_file(path: str | pathlib.Path, kind: str) -> types.ModuleType:
    """Executes a Python file (a config or sweep file) as a fresh module.

    Raises:
        ConfigError: the file does not exist ("`kind` file ... does not exist").
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"{kind} file {str(path)!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"t2jax_{kind}_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config(arg)` of a Python config file named "path.py[:arg]".

    Raises:
        ConfigError: the file is missing or has no `get_config`.
    """
    path, _, arg = spec.partition(":")
    module = load_python_file(path, "config")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    return module.get_config(arg) if arg else module.get_config()


def resolve_config(
    cls: type[Config], spec: str, overrides: Mapping[str, Any] | None = None
) -> Config:
    """The validated `cls` config of a config file spec plus dotted overrides (see
    `with_overrides`)."""
    return with_overrides(from_config_dict(cls, load_config_file(spec)), overrides or {})

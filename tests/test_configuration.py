"""The configuration library: Literal choices checked on construction and on every conversion,
dotted overrides, ConfigDict round trips for any config dataclass."""

import dataclasses
from typing import Literal

import pytest

from t2jax import configuration
from t2jax.configuration import ConfigError


@dataclasses.dataclass(frozen=True)
class Inner:
    kind: Literal["a", "b"] = "a"
    size: int | None = None
    mode: Literal["x", "y"] | None = None

    def __post_init__(self):
        configuration.check_choices(self, "inner")


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    rate: float = 0.5
    names: tuple[str, ...] = ("p", "q")


def test_choices_are_checked_on_construction_and_conversion():
    with pytest.raises(ConfigError, match=r"inner.kind='c' is not one of 'a', 'b'"):
        Inner(kind="c")
    with pytest.raises(ConfigError, match=r"inner.kind='c' is not one of 'a', 'b'"):
        configuration.from_dict(Outer, {"inner": {"kind": "c"}})
    with pytest.raises(ConfigError, match=r"inner.mode='z' is not one of 'x', 'y'"):
        configuration.with_overrides(Outer(), {"inner.mode": "z"})
    assert Inner(mode=None).mode is None


def test_overrides_parse_by_field_type():
    config = configuration.with_overrides(
        Outer(),
        {"inner.kind": "b", "inner.size": "none", "rate": "2", "names": "u,v,w", "inner.mode": "y"},
    )
    assert config == Outer(
        inner=Inner(kind="b", size=None, mode="y"), rate=2.0, names=("u", "v", "w")
    )
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.kinds'"):
        configuration.with_overrides(Outer(), {"inner.kinds": "a"})
    with pytest.raises(ConfigError, match="rate must be float"):
        configuration.with_overrides(Outer(), {"rate": "fast"})
    with pytest.raises(ConfigError, match=r"inner\.size must be int"):
        configuration.from_dict(Outer, {"inner": {"size": True}})


def test_dict_and_config_dict_round_trips():
    config = Outer(inner=Inner(kind="b", size=3), rate=0.25)
    assert configuration.from_dict(Outer, configuration.to_dict(config)) == config
    values = configuration.to_config_dict(Outer())
    values.inner.size = 7  # a typed placeholder accepts an int
    values.inner.mode = "x"
    assert configuration.from_config_dict(Outer, values) == Outer(inner=Inner(size=7, mode="x"))
    assert configuration.leaf_types(Outer)["inner.kind"] == Literal["a", "b"]


def test_adapt_command_line_builds_one_config_file_then_flags_then_overrides():
    from t2jax.adaptation.config import AdaptConfig
    from t2jax.cli import adapt as adapt_cli
    from t2jax.cli import app

    argv = [
        "adapt",
        "--config=experiments/configs/adapt.py:task=math,strategy=fewshot,preset=cpu",
        "--experts=math=m.safetensors,code=c.safetensors",
        "--generations=3",
        "--config.options.few_shot.population_size=4",
        "--rows-per-call=8",
        "--no-progress",
    ]
    config = adapt_cli.adapt_config(app.build_parser().parse_args(argv))
    assert isinstance(config, AdaptConfig)
    assert (config.strategy, config.requests.task) == ("fewshot", "math")
    assert config.options.max_new_tokens == 256  # the cpu preset
    assert config.options.few_shot.generations == 3  # a flag over the file
    assert config.options.few_shot.population_size == 4  # an override over the file
    assert config.options.few_shot.shots == 5 and config.options.few_shot.rows_per_call == 8
    assert config.options.rows_per_call == 8 and not config.run.progress
    with pytest.raises(ConfigError, match=r"--prompt"):
        adapt_cli.adapt_config(
            app.build_parser().parse_args(["adapt", "--model", "m", "--experts", "math=m"])
        )

"""Typed, frozen configuration of an SVF expert training run (REINFORCE, spec section 2), and its
conversions: plain dicts (JSON), `ml_collections.ConfigDict` (config files, absl overrides) and
dotted command-line overrides ("rl.lr=1e-3").

`TrainConfig` nests one section per concern. Defaults are the official recipe (spec section 2.4):
Adam lr 2e-3 constant, global-norm clip 1e-3, 256 prompts per step drawn without replacement with
seed 42, greedy rollouts (one per prompt), rewards +1/-1 with no baseline, no KL, evaluation every
10 steps, 200 steps (`scripts/train_task_expert.sh`). Options beyond the official code are off by
default. Every section validates itself, so a bad config fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import ml_collections
from ml_collections import config_dict

from t2jax.config import ConfigError, MeshConfig
from t2jax.svf.core import OFFICIAL_PARAMETRIZATION, Parametrization

OPTIMIZERS = ("adam", "adamw_cosine")
KL_DIRECTIONS = ("ref_policy", "policy_ref")
ADVANTAGES = ("none", "normalize", "leave_one_out")
COMPLETION_TOKENS = ("retokenize", "sampled")
SVF_MODES = ("merged", "factored")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    _require(value in choices, f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Which model to load and where.

    Attributes:
        name: registry name, `.gguf` file, HF directory or hub id (see `t2jax.loading`).
        dtype: "float32" or "bfloat16"; None picks `t2jax.loading.default_dtype()`.
        stacked: layer layout (None: the backend's faster one, see `t2jax.model`).
        mesh: device mesh; the batch is split over its data axes, weights FSDP-sharded.
    """

    name: str = "smollm2-135m-instruct"
    dtype: str | None = None
    stacked: bool | None = None
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        _require(bool(self.name), "model.name must name a model")
        if self.dtype is not None:
            _one_of("model.dtype", self.dtype, ("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class TaskSection:
    """The task, its splits and the generation budget.

    Attributes:
        name: a `t2jax.tasks` name (gsm8k, arc_easy, ...) or a synthetic task of
            `t2jax.tasks_synthetic`.
        data_dir: benchmark data directory (None: `$T2JAX_DATA`).
        train_split: split the rollouts are drawn from.
        valid_split: split that selects the best expert.
        train_limit: use only the first N training items (None: all).
        eval_train_limit: evaluate on the first N training items (None: all; 0: skip).
        valid_limit: evaluate on the first N validation items (None: all).
        valid_sample: evaluate on a seeded random subset of N validation items instead (seed 0,
            `t2jax.evaluate.subsample`): first-N subsets can be skewed (ARC's first items).
        test_split: an untouched split evaluated for the base model and the best expert after
            training (None: skip).
        test_limit: first N items of the test split (None: all).
        official_quirks: render prompts byte for byte as the official code (`render_prompt`).
        max_new_tokens: generation budget (None: the task's official one).
        eval_batch_size: prompts per sampler call during evaluation.
    """

    name: str = "gsm8k"
    data_dir: str | None = None
    train_split: str = "train"
    valid_split: str = "valid"
    train_limit: int | None = None
    eval_train_limit: int | None = None
    valid_limit: int | None = None
    valid_sample: int | None = None
    test_split: str | None = None
    test_limit: int | None = None
    official_quirks: bool = False
    max_new_tokens: int | None = None
    eval_batch_size: int = 64

    def __post_init__(self):
        _require(bool(self.name), "task.name must name a task")
        for field in ("train_limit", "valid_limit", "valid_sample", "test_limit", "max_new_tokens"):
            value = getattr(self, field)
            _require(value is None or value > 0, f"task.{field} must be positive, got {value}")
        _require(
            self.eval_train_limit is None or self.eval_train_limit >= 0,
            f"task.eval_train_limit must be >= 0, got {self.eval_train_limit}",
        )
        _require(self.eval_batch_size > 0, "task.eval_batch_size must be positive")
        _require(
            self.valid_limit is None or self.valid_sample is None,
            "task.valid_limit and task.valid_sample exclude each other",
        )


@dataclasses.dataclass(frozen=True)
class SVFSection:
    """What is adapted and how (spec sections 1.2-1.4).

    Attributes:
        targets: target set or module keys (see `t2jax.svd.resolve_targets`); official: "mlp".
        parametrization: z = sigmoid(p) * max_mult (official) or plain z.
        init_std: noise of the initial parameters (official 0.01).
        mode: how the teacher-forced pass applies W'(z): "merged" (compose W' per layer) or
            "factored" (((x A) * c s z) B, never materializing W'). Rollouts always merge.
        cache_dir: where SVD factors are cached (None: the user cache directory).
    """

    targets: str = "mlp"
    parametrization: Parametrization = OFFICIAL_PARAMETRIZATION
    init_std: float = 0.01
    mode: str = "merged"
    cache_dir: str | None = None

    def __post_init__(self):
        _one_of("svf.mode", self.mode, SVF_MODES)
        _require(self.init_std >= 0, f"svf.init_std must be >= 0, got {self.init_std}")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """REINFORCE hyper-parameters (spec sections 2.2-2.4). Hashable: it is a static argument of
    the jitted gradient and update functions.

    Attributes:
        lr: learning rate (official 2e-3).
        max_grad_norm: global-norm gradient clip (official 1e-3).
        optimizer: "adam" (official code: constant lr) or "adamw_cosine" (the paper: AdamW with
            cosine decay over `num_iters`).
        weight_decay: AdamW's decoupled weight decay ("adamw_cosine" only).
        batch_size: prompts per update (official 256; capped at the training-set size).
        microbatch_size: rows per `lax.scan` step of the gradient, rounded up to a multiple of
            the data-parallel size. None: the whole batch at once on CPU; on TPU/GPU the
            largest that fits the chips' memory (`t2jax.plan.default_rl_memory`).
        num_iters: number of updates.
        eval_every: evaluate after update i when i % eval_every == 0 (i from 0; official 10).
        seed: seed of the batch order (`np.random.RandomState(seed).choice` per step, as in the
            official code), the initial parameters and the rollout sampling.
        kl_coeff: lambda of the KL penalty to the base model (official 0).
        kl_direction: "ref_policy" = KL(pi_ref || pi), the official code's; "policy_ref" =
            KL(pi || pi_ref), the paper's. Summed over generated positions and the vocabulary.
        samples_per_prompt: K rollouts per prompt (official 1).
        temperature: rollout temperature (official 0: greedy).
        top_p: rollout nucleus mass.
        advantage: "none" (official: the raw reward), "normalize" (batch mean/std), or
            "leave_one_out" (reward minus the mean of the prompt's other K-1 rollouts).
        length_normalize: divide each sequence's log-likelihood by its token count.
        incorrect_reward: reward of a wrong answer (official -1; the paper's VLM run uses -0.1).
        require_extracted_answer: reward only correct completions in which the scorer found an
            answer (no credit for ARC's fallback guess; see `t2jax.reinforce.rewards_of`).
        completion_tokens: "retokenize" (official: tokenize prompt + output text and take the ids
            after the prompt's) or "sampled" (the sampler's own ids, cut at the stop string).
        logprob_chunk: sequence positions per chunk of the log-softmax (the [B, T, V] logits
            are never materialized at once).
        remat: recompute each layer's activations in the backward pass (`jax.checkpoint`):
            peak memory of the gradient step drops from all layers' activations to one
            layer's, for about one extra forward pass. None: off on CPU, on on TPU/GPU (where
            the paper's models need it to fit, see `t2jax.plan`).
        rollout_batch_size: prompts per sampler call (None: the whole batch).
    """

    lr: float = 2e-3
    max_grad_norm: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.01
    batch_size: int = 256
    microbatch_size: int | None = None
    num_iters: int = 200
    eval_every: int = 10
    seed: int = 42
    kl_coeff: float = 0.0
    kl_direction: str = "ref_policy"
    samples_per_prompt: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    advantage: str = "none"
    length_normalize: bool = False
    incorrect_reward: float = -1.0
    require_extracted_answer: bool = False
    completion_tokens: str = "retokenize"
    logprob_chunk: int = 128
    remat: bool | None = None
    rollout_batch_size: int | None = None

    def __post_init__(self):
        _require(self.lr > 0, f"rl.lr must be positive, got {self.lr}")
        _require(
            self.max_grad_norm > 0, f"rl.max_grad_norm must be positive, got {self.max_grad_norm}"
        )
        _one_of("rl.optimizer", self.optimizer, OPTIMIZERS)
        _one_of("rl.kl_direction", self.kl_direction, KL_DIRECTIONS)
        _one_of("rl.advantage", self.advantage, ADVANTAGES)
        _one_of("rl.completion_tokens", self.completion_tokens, COMPLETION_TOKENS)
        for field in ("batch_size", "num_iters", "eval_every", "samples_per_prompt"):
            _require(getattr(self, field) > 0, f"rl.{field} must be positive")
        for field in ("microbatch_size", "rollout_batch_size"):
            value = getattr(self, field)
            _require(value is None or value > 0, f"rl.{field} must be positive, got {value}")
        _require(self.logprob_chunk > 0, "rl.logprob_chunk must be positive")
        _require(self.kl_coeff >= 0, f"rl.kl_coeff must be >= 0, got {self.kl_coeff}")
        _require(self.temperature >= 0, f"rl.temperature must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"rl.top_p must be in (0, 1], got {self.top_p}")
        _require(
            self.advantage != "leave_one_out" or self.samples_per_prompt > 1,
            "rl.advantage='leave_one_out' needs rl.samples_per_prompt > 1",
        )
        _require(
            self.samples_per_prompt == 1 or self.temperature > 0,
            "rl.samples_per_prompt > 1 needs rl.temperature > 0 (greedy rollouts are identical)",
        )


@dataclasses.dataclass(frozen=True)
class RunSection:
    """Where and how a run records itself.

    Attributes:
        workdir: run directory (config, metrics, checkpoints, experts, plots).
        checkpoint_every: save the training state every N updates.
        keep_checkpoints: how many recent checkpoints orbax keeps.
        eval_base: evaluate the base model (z = 1) before training, as step 0 of the curves
            (never a best-expert candidate, as in the official code).
        eval_at_end: also evaluate after the last update when it is not an evaluation step.
        progress: show a progress bar.
        tensorboard: write TensorBoard event files.
    """

    workdir: str = "runs/svf"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    eval_base: bool = True
    eval_at_end: bool = True
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        _require(bool(self.workdir), "run.workdir must be set")
        _require(self.checkpoint_every > 0, "run.checkpoint_every must be positive")
        _require(self.keep_checkpoints > 0, "run.keep_checkpoints must be positive")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything an SVF training run needs."""

    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    svf: SVFSection = SVFSection()
    rl: RLConfig = RLConfig()
    run: RunSection = RunSection()


# ----------------------------------------------------------------------------------------------
# Conversions.


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready nested dict of a config dataclass (tuples become lists)."""
    return _jsonable(dataclasses.asdict(config))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def from_dict(cls: type, values: Mapping[str, Any], path: str = "") -> Any:
    """Builds config dataclass `cls` from a nested mapping; missing keys keep their defaults.

    Raises:
        ConfigError: an unknown key, or a value of the wrong type.
    """
    hints = _field_types(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(path + key for key in unknown)}; "
            f"{path or 'the config'} has {', '.join(sorted(hints))}"
        )
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(value, hints[key], path + key)
    return cls(**kwargs)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    """`value` converted to `annotation` (dataclass, Optional, tuple, float, int, bool, str)."""
    if dataclasses.is_dataclass(annotation):
        if dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return from_dict(annotation, value, path + ".")
    options = _optional_inner(annotation)
    if options is not None:
        return None if value is None else _coerce(value, options, path)
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a sequence, got {value!r}")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_coerce(item, item_type, path) for item in value)
    if origin is Literal:
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


def _optional_inner(annotation: Any) -> Any:
    """X for `X | None`, else None."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return inner[0] if len(inner) == 1 else None


def leaf_types(cls: type = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> type annotation of every leaf field ("rl.lr" -> float)."""
    leaves = {}
    for name, annotation in _field_types(cls).items():
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
    inner = _optional_inner(annotation)
    if inner is not None:
        return None if text.strip().lower() in ("none", "null") else parse_value(text, inner, path)
    if typing.get_origin(annotation) is tuple:
        (item_type, _) = typing.get_args(annotation)
        items = [item.strip() for item in text.strip().strip("()[]").split(",") if item.strip()]
        return tuple(parse_value(item, item_type, path) for item in items)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{path} must be true or false, got {text!r}")
        return lowered in ("true", "1", "yes")
    try:
        return annotation(text) if annotation in (int, float) else text
    except ValueError:
        raise ConfigError(f"{path} must be {annotation.__name__}, got {text!r}") from None


def with_overrides(config: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """`config` with dotted-path overrides ({"rl.lr": 1e-3} or {"rl.lr": "1e-3"}) applied; string
    values are parsed by the field's type.

    Raises:
        ConfigError: an unknown path or a bad value.
    """
    leaves = leaf_types()
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
    return from_dict(TrainConfig, values)


def to_config_dict(config: TrainConfig) -> ml_collections.ConfigDict:
    """A `ConfigDict` of `config` for config files and `ml_collections.config_flags`: optional
    fields left at None become typed placeholders, so `--config.task.valid_limit=100` works."""
    return ml_collections.ConfigDict(_config_dict_values(config))


def _config_dict_values(config: Any) -> dict[str, Any]:
    values = {}
    for name, annotation in _field_types(type(config)).items():
        value = getattr(config, name)
        inner = _optional_inner(annotation)
        if dataclasses.is_dataclass(value):
            values[name] = _config_dict_values(value)
        elif value is None and inner is not None:
            values[name] = config_dict.placeholder(typing.get_origin(inner) or inner)
        else:
            values[name] = value
    return values


def from_config_dict(values: ml_collections.ConfigDict | Mapping[str, Any]) -> TrainConfig:
    """The `TrainConfig` of a `ConfigDict` (or plain nested mapping), validated."""
    if isinstance(values, ml_collections.ConfigDict):
        values = values.to_dict()
    return from_dict(TrainConfig, values)


# ----------------------------------------------------------------------------------------------
# Config files ("path.py" or "path.py:arg", as `ml_collections.config_flags` reads them).


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


def resolve_config(spec: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The validated `TrainConfig` of a config file spec plus dotted overrides (see
    `with_overrides`)."""
    return with_overrides(from_config_dict(load_config_file(spec)), overrides or {})

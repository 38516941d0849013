"""Static, hashable configuration dataclasses.

Configs are frozen dataclasses: they are passed to `jax.jit` as static arguments (or closed
over), so every field must be hashable. Only arrays cross `jit` boundaries as traced values:
changing a config field recompiles, changing an array value never does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from t2jax.configuration import ConfigError, check_choices, require

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# HF config keys we read, or that are known not to change the forward pass (training-only,
# generation, bookkeeping). Any other key is an error unless it holds its neutral value.
_IGNORED_HF_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "initializer_range",
        "attention_dropout",
        "model_type",
        "_name_or_path",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
        "max_position_embeddings",
        "max_window_layers",
        "tokenizer_class",
        "quantization_config",
        "bos_token",
        "eos_token",
        "tie_encoder_decoder",
        "prefix",
        "task_specific_params",
        "finetuning_task",
        "tf_legacy_loss",
        "use_bfloat16",
        "torchscript",
        "pruned_heads",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "is_decoder",
        "sep_token_id",
        "decoder_start_token_id",
        "tokenizer_config",
        "unsloth_fixed",
        "embd_pdrop",
        "resid_pdrop",
        "layer_types",
    }
)
# Keys that change the math: accepted only with the value listed (their neutral value).
_NEUTRAL_HF_VALUES: Mapping[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "pretraining_tp": (1, None),
    "mlp_bias": (False, None),
    "use_sliding_window": (False, None),
    "qk_layernorm": (False, None),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from an HF `config.json` dict, rejecting anything that changes the math.

        Raises:
            ConfigError: unsupported `model_type`, unknown rope type, or an unknown key that is not
                at its neutral value.
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported architecture model_type={model_type!r}; t2jax supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        _check_unknown_keys(hf)
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hidden // heads
        theta, scaling = _parse_rope(hf)
        is_qwen2 = model_type == "qwen2"
        window = hf.get("sliding_window") if model_type == "mistral" else None
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
            o_bias=not is_qwen2 and bool(hf.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
        )


_KNOWN_HF_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "attention_bias",
        "sliding_window",
    }
)


def _check_unknown_keys(hf: Mapping[str, Any]) -> None:
    for key, value in hf.items():
        if key in _KNOWN_HF_KEYS or key in _IGNORED_HF_KEYS:
            continue
        if key in _NEUTRAL_HF_VALUES:
            if value not in _NEUTRAL_HF_VALUES[key]:
                raise ConfigError(f"config key {key}={value!r} is not supported by t2jax")
            continue
        raise ConfigError(
            f"unknown config key {key!r} (value {value!r}): it may change the model's math, so "
            "t2jax refuses to guess. Remove it if it is irrelevant."
        )


def _parse_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads rope theta and scaling from either the v4 (`rope_scaling`) or v5 (`rope_parameters`)
    layout of an HF config."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"unsupported rope type {rope_type!r}; supported: default, llama3")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise ConfigError(f"llama3 rope scaling is missing {missing}") from None
    return theta, scaling


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler settings. Values that change per call (temperature, top-p, max_new_tokens)
    are call arguments, not config fields, so they never trigger a recompilation."""

    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    # Between decode chunks, once at most half of the rows are still generating, continue with
    # those rows only (the batch halves to a power of two; each new size compiles once).
    compact_rows: bool = True
    # Rows of one weight set that share at least this many leading prompt tokens prefill them
    # once (`t2jax.prefill.prefill_shared`); 0 turns it off.
    min_shared_prefix: int = 32
    # Decode and prefill with q|k|v and gate|up each as one matmul (`model.fuse_projections`):
    # fewer, larger ops per step, and a fused copy of those kernels held by the sampler (HBM that
    # `t2jax plan` does not count). Off by default: on a 2-core CPU it loses 1-4% at batch 8-32
    # and gains 4-12% at batch 1, where the native kernel already takes each unfused group in
    # one call (docs/performance.md, benchmarks/decode_tunix.py).
    fuse_projections: bool = False


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. `-1` in one axis takes all remaining devices. None (the default): chosen
    for the model and devices when it is loaded (`t2jax.plan.rules.default_mesh_shape`: all
    data-parallel on CPU or when the weights fit a chip, else FSDP-sharded)."""

    shape: tuple[int, ...] | None = None
    axis_names: tuple[str, ...] = ("data", "fsdp", "tensor")

    def __post_init__(self):
        if self.shape is None:
            return
        if len(self.shape) != len(self.axis_names):
            raise ConfigError(f"mesh shape {self.shape} and axis names {self.axis_names} differ")
        if sum(size == -1 for size in self.shape) > 1:
            raise ConfigError(f"at most one mesh axis may be -1, got {self.shape}")


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
    dtype: Literal["float32", "bfloat16"] | None = None
    stacked: bool | None = None
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        require(bool(self.name), "model.name must name a model")
        check_choices(self, "model")

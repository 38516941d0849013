"""The models a plan is made for: the paper's four (architecture only, no weights needed) or any
loadable model, and the bytes of their parameters."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from t2jax.checkpoints import common as checkpoints_common
from t2jax.checkpoints import load_checkpoint
from t2jax.config import ModelConfig


def _decoder_config(
    model_type: str,
    *,
    vocab: int,
    width: int,
    ffw: int,
    layers: int,
    heads: int,
    kv_heads: int,
    rope_theta: float,
    max_positions: int,
    rms_norm_eps: float = 1e-5,
    **extra: Any,
) -> dict[str, Any]:
    """The architecture keys of an HF config.json of a Llama/Mistral/Qwen2-style decoder with
    untied embeddings (`extra`: the family's own keys)."""
    return dict(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=ffw,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=False,
        max_position_embeddings=max_positions,
        **extra,
    )


def _llama3(width: int, ffw: int, layers: int, heads: int) -> dict[str, Any]:
    return _decoder_config(
        "llama",
        vocab=128256,
        width=width,
        ffw=ffw,
        layers=layers,
        heads=heads,
        kv_heads=8,
        rope_theta=500000.0,
        max_positions=8192,
    )


# HF config.json contents (architecture keys) of the paper's models: plan without weights.
PAPER_MODELS: dict[str, dict[str, Any]] = {
    "Llama-3-8B-Instruct": _llama3(width=4096, ffw=14336, layers=32, heads=32),
    "Llama-3-70B-Instruct": _llama3(width=8192, ffw=28672, layers=80, heads=64),
    "Mistral-7B-Instruct-v0.3": _decoder_config(
        "mistral",
        vocab=32768,
        width=4096,
        ffw=14336,
        layers=32,
        heads=32,
        kv_heads=8,
        rope_theta=1000000.0,
        max_positions=32768,
        head_dim=128,
        sliding_window=None,
    ),
    "Qwen2.5-7B-Instruct": _decoder_config(
        "qwen2",
        vocab=152064,
        width=3584,
        ffw=18944,
        layers=28,
        heads=28,
        kv_heads=4,
        rope_theta=1000000.0,
        max_positions=32768,
        rms_norm_eps=1e-6,
        sliding_window=131072,
        use_sliding_window=False,
        max_window_layers=28,
    ),
}


def model_config(name: str) -> ModelConfig:
    """The architecture of a paper model name (no weights needed), registry name, HF directory
    or hub id."""
    if name in PAPER_MODELS:
        return ModelConfig.from_hf(PAPER_MODELS[name])
    return load_checkpoint(name, progress=False).config


def parameter_bytes(config: ModelConfig, dtype: Any = jnp.bfloat16) -> int:
    """Bytes of the model's parameters in `dtype`."""
    count = sum(
        math.prod(shape) for shape in checkpoints_common.expected_hf_shapes(config).values()
    )
    return count * jnp.dtype(dtype).itemsize

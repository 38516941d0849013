"""Tiny random models for the SVF tests (numpy only, no torch), and the Llama-3-8B config."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import safetensors.numpy
import tiny

from t2jax import loading
from t2jax.checkpoints import common as checkpoints_common
from t2jax.config import ModelConfig
from t2jax.svf import cache as svf_cache
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets

# Kernel ranks differ by target (q/o 32, k/v 16, MLP 32), so mixed-up targets show as shape errors.
CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    rope_theta=10000.0,
)

# Meta-Llama-3-8B-Instruct's config.json (shapes only; no weights needed).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def random_tensors(config: ModelConfig = CONFIG, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named random tensors for `config` (norm weights near 1, kernels ~ N(0, 1/in))."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in checkpoints_common.expected_hf_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    return tensors


def model(seed: int = 0, stacked: bool = False, config: ModelConfig = CONFIG):
    """(tensors, weights, fingerprint) of a random model."""
    tensors = random_tensors(config, seed)
    weights = loading.weights_from_hf(config, tensors, stacked=stacked)
    return tensors, weights, svf_cache.fingerprint(config, tensors)


def factors(tensors, fingerprint, targets=svf_targets.TARGET_SETS["mlp"], stacked=False, mesh=None):
    """In-memory fp32 SVD factors of `targets`."""
    return svf_factors.decompose(
        CONFIG,
        svf_factors.kernels_from_tensors(tensors),
        targets,
        fingerprint=fingerprint,
        placement=svf_factors.Placement(stacked=stacked, mesh=mesh),
        progress=False,
    )


def hf_config(config: ModelConfig = CONFIG) -> dict:
    """The HF `config.json` dict of `config`."""
    return {
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def save_hf_dir(directory: pathlib.Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes a loadable HF checkpoint directory of a random `CONFIG` model; returns its tensors."""
    tensors = random_tensors(CONFIG, seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config()))
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    tiny.tiny_tokenizer().save_pretrained(directory)
    return tensors

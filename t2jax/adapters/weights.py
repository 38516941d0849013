"""LoRA / IA3 / DoRA adapters against a model's weights: fresh trainable adapters initialized as
PEFT does (the adapted model starts as the base model), and adapters merged into the weights so
that generation runs at the base model's cost.

PEFT's initialization (`LoraConfig(init_lora_weights=True)`, `IA3Config(init_ia3_weights=True)`):
LoRA A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0; DoRA the same with the
magnitude m = ||W|| per output feature (W' = W at the start); IA3 vectors = 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from t2jax import model as model_lib
from t2jax.adapters.core import (
    IA3_INPUT_MODULES,
    DoRATarget,
    IA3Target,
    Kind,
    LayerAdapters,
    LoRATarget,
    ModelAdapters,
    Target,
    merge,
)

Array = jax.Array


def _kernel(weights: model_lib.Weights, layer: int, name: str) -> Array:
    """Layer `layer`'s kernel `name` [in, out], in either layer layout."""
    return model_lib.layer_slice(weights.layers, layer)[name]


def _initial_target(
    key: Array, kernels: Array, kind: Kind, name: str, rank: int, alpha: float
) -> Target:
    """A fresh target for the stacked kernels [L, in, out] of one module (fp32 leaves)."""
    num_layers, fan_in, fan_out = kernels.shape
    if kind == "ia3":
        size = fan_in if name in IA3_INPUT_MODULES else fan_out
        return IA3Target(jnp.ones((num_layers, size), jnp.float32), name in IA3_INPUT_MODULES)
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, (num_layers, fan_in, rank), jnp.float32, -bound, bound)
    b = jnp.zeros((num_layers, rank, fan_out), jnp.float32)
    if kind == "lora":
        return LoRATarget(a, b, alpha / rank)
    norms = jnp.sqrt(jnp.sum(jnp.square(kernels.astype(jnp.float32)), axis=1))  # [L, out]
    return DoRATarget(a, b, norms, alpha / rank)


def init_adapters(
    key: Array,
    weights: model_lib.Weights,
    kind: Kind,
    targets: Sequence[str],
    *,
    rank: int = 16,
    alpha: float = 32.0,
) -> ModelAdapters:
    """A fresh adapter of `kind` on the `targets` (HF module keys) of every layer, stacked
    ([L, ...] leaves, which `model.forward` applies to either weight layout), initialized as
    PEFT does so that the adapted model equals the base model.

    Raises:
        ValueError: a target whose dense kernel is not in `weights`, or a bad rank / alpha.
    """
    if rank <= 0 or alpha <= 0:
        raise ValueError(f"rank and alpha must be positive, got rank={rank}, alpha={alpha}")
    first = model_lib.layer_slice(weights.layers, 0)
    missing = sorted(name for name in targets if name not in first)
    if missing:
        raise ValueError(f"the weights lack the dense kernels of {missing}")
    num_layers = len(weights.layers) if isinstance(weights.layers, tuple) else None
    layers = {}
    for index, name in enumerate(targets):
        if num_layers is None:
            kernels = weights.layers[name]  # [L, in, out]
        else:
            kernels = jnp.stack([_kernel(weights, i, name) for i in range(num_layers)])
        layers[name] = _initial_target(
            jax.random.fold_in(key, index), kernels, kind, name, rank, alpha
        )
    return ModelAdapters(LayerAdapters(layers))


def merge_into_weights(weights: model_lib.Weights, adapters: ModelAdapters) -> model_lib.Weights:
    """Weights whose adapted kernels (and, for IA3 on an output, biases) are merged with
    `adapters` (stacked or per layer; one adapter shared by the batch, no dropout), in the
    weights' layout and dtype. Jit-able."""
    layer_adapters = adapters.layers

    def merged_layer(layer: dict[str, Array], layer_targets: dict[str, Target]) -> dict[str, Array]:
        new = dict(layer)
        for name, target in layer_targets.items():
            kernel, bias = merge(layer[name], layer.get(f"{name}.bias"), target)  # [in, out]
            new[name] = kernel
            if bias is not None:
                new[f"{name}.bias"] = bias
        return new

    if model_lib.is_stacked(weights.layers):
        stacked = model_lib.stack_layers(layer_adapters)
        layers = jax.vmap(merged_layer)(weights.layers, stacked.targets)
        return dataclasses.replace(weights, layers=layers)
    layers = tuple(
        merged_layer(layer, model_lib.layer_slice(layer_adapters, i).targets)
        for i, layer in enumerate(weights.layers)
    )
    return dataclasses.replace(weights, layers=layers)

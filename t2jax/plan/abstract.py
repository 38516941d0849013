"""Abstract arguments of t2jax's programs: `jax.ShapeDtypeStruct`s with the shardings the real
arrays get (weights as `t2jax.loading.load_model` places them, SVD factors, z), nothing
materialized, so that a paper-size model lowers on any host."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from t2jax import model as model_lib
from t2jax import parallel
from t2jax.checkpoints import common as checkpoints_common
from t2jax.config import ModelConfig
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets


def abstract_array(shape: Sequence[int], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    """An abstract array of `shape` and `dtype` placed with `sharding`."""
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_replicated(
    shape: Sequence[int], dtype: Any, mesh: jax.sharding.Mesh
) -> jax.ShapeDtypeStruct:
    """An abstract array replicated on every device of `mesh`."""
    return abstract_array(shape, dtype, parallel.replicated(mesh))


def abstract_batched(
    shape: Sequence[int], dtype: Any, mesh: jax.sharding.Mesh
) -> jax.ShapeDtypeStruct:
    """An abstract array whose first axis (rows) is split like a batch."""
    return abstract_array(shape, dtype, parallel.batch_sharding(mesh))


def _layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer key -> shape of one layer's leaf, in `x @ W` orientation."""
    hf = checkpoints_common.expected_hf_shapes(config)
    shapes = {}
    for key, name in checkpoints_common.hf_layer_tensor_names(config, 0).items():
        shape = hf[name]
        transposed = key in model_lib.ATTN_KERNELS + model_lib.MLP_KERNELS
        shapes[key] = tuple(reversed(shape)) if transposed else shape
    return shapes


def abstract_weights(
    config: ModelConfig, mesh: jax.sharding.Mesh, dtype: Any, skip: Sequence[str] = ()
) -> model_lib.Weights:
    """Stacked `Weights` of `ShapeDtypeStruct`s sharded as `t2jax.loading.load_model` places
    them, without the per-layer kernels in `skip` (SVF targets replaced by factors)."""

    def leaf(key: str, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
        return abstract_array(shape, dtype, parallel.weight_sharding(key, shape, mesh))

    layers = {
        key: leaf(key, (config.num_layers, *shape))
        for key, shape in _layer_shapes(config).items()
        if key not in skip
    }
    vocab, width = config.vocab_size, config.hidden_size
    return model_lib.Weights(
        embed=leaf("embed", (vocab, width)),
        layers=layers,
        final_norm=leaf("final_norm", (width,)),
        lm_head=None if config.tie_word_embeddings else leaf("lm_head", (width, vocab)),
    )


def abstract_factors(
    config: ModelConfig, mesh: jax.sharding.Mesh, dtype: Any, targets: Sequence[str]
) -> svf_factors.ModelFactors:
    """Stacked full-rank SVD factors of the targets, sharded as `svf_factors.place_factors`
    places them."""
    layers = {}
    for key in svf_targets.resolve_targets(targets):
        fan_in, fan_out = svf_targets.kernel_shape(config, key)
        rank = min(fan_in, fan_out)
        shapes = {
            "a": ((config.num_layers, fan_in, rank), dtype),
            "s": ((config.num_layers, rank), jnp.float32),
            "b": ((config.num_layers, rank, fan_out), dtype),
        }
        parts = {
            part: abstract_array(
                shape, part_dtype, svf_factors.factor_sharding(key, part, shape, mesh)
            )
            for part, (shape, part_dtype) in shapes.items()
        }
        layers[key] = svf_factors.Factor(**parts)
    return svf_factors.ModelFactors(layers=layers, fingerprint="plan")


def abstract_z(
    factors: svf_factors.ModelFactors, mesh: jax.sharding.Mesh, rows: int | None
) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract z: [L, R] replicated (one expert) or [L, B, R] rows split like the batch."""
    layers = factors.num_layers
    if rows is None:
        return {
            key: abstract_replicated((layers, rank), jnp.float32, mesh)
            for key, rank in factors.ranks().items()
        }
    spec = jax.sharding.PartitionSpec(None, parallel.batch_sharding(mesh).spec[0], None)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return {
        key: abstract_array((layers, rows, rank), jnp.float32, sharding)
        for key, rank in factors.ranks().items()
    }

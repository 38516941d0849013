"""Loads a model end to end: checkpoint -> config, placed weights, tokenizer, end ids."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from t2jax import model as model_lib
from t2jax import parallel
from t2jax.checkpoints import Checkpoint, load_checkpoint
from t2jax.checkpoints.common import hf_layer_tensor_names
from t2jax.config import MeshConfig, ModelConfig, ModelSection
from t2jax.plan import hardware as plan_hardware
from t2jax.plan import rules as plan_rules


@dataclasses.dataclass
class LoadedModel:
    """Everything needed to run a checkpoint: architecture, weights, tokenizer, end ids, mesh."""

    config: ModelConfig
    weights: model_lib.Weights
    tokenizer: Any
    eos_ids: tuple[int, ...]
    mesh: jax.sharding.Mesh
    checkpoint: Checkpoint


def weights_from_hf(
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    dtype: Any = jnp.float32,
    stacked: bool | None = None,
    skip: Callable[[str], bool] = lambda name: False,
    place: Callable[[str, np.ndarray], jax.Array] | None = None,
    progress: bool = False,
) -> model_lib.Weights:
    """Builds `Weights` from HF-named tensors in HF [out, in] orientation.

    Args:
        config: the model architecture.
        tensors: HF name -> array (may load lazily; each tensor is read once).
        dtype: parameter dtype (see `t2jax.loading.default_dtype`).
        stacked: layer layout; defaults to `default_layout_is_stacked()`.
        skip: predicate on our per-layer keys ("mlp.gate_proj") whose dense kernels to drop, e.g.
            once SVD factors replace them.
        place: optional `(key, host_array) -> device array` used to shard leaves as they load.
        progress: show a progress bar over layers.

    Raises:
        KeyError: a tensor the config requires is missing.
    """
    stacked = model_lib.default_layout_is_stacked() if stacked is None else stacked
    place = place or (lambda key, x: jnp.asarray(x))

    def fetch(name: str, transpose: bool) -> np.ndarray:
        if name not in tensors:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        array = np.asarray(tensors[name], dtype=np.float32)
        return (array.T if transpose else array).astype(dtype)

    def layer(index: int) -> dict[str, np.ndarray]:
        return {
            key: fetch(name, transpose=key in model_lib.ATTN_KERNELS + model_lib.MLP_KERNELS)
            for key, name in hf_layer_tensor_names(config, index).items()
            if not skip(key)
        }

    indices = tqdm.trange(config.num_layers, desc="loading layers", disable=not progress)
    per_layer = [layer(i) for i in indices]
    if stacked:
        layers = {key: place(key, np.stack([lw[key] for lw in per_layer])) for key in per_layer[0]}
    else:
        layers = tuple({key: place(key, x) for key, x in lw.items()} for lw in per_layer)
    lm_head = None
    if not config.tie_word_embeddings:
        lm_head = place("lm_head", fetch("lm_head.weight", transpose=True))
    return model_lib.Weights(
        embed=place("embed", fetch("model.embed_tokens.weight", transpose=False)),
        layers=layers,
        final_norm=place("final_norm", fetch("model.norm.weight", transpose=False)),
        lm_head=lm_head,
    )


def default_dtype() -> Any:
    """bf16 parameters on every backend. On CPU they run with fp32 activations (see
    `t2jax.model.activation_dtype`): XLA:CPU's bf16 matmuls are ~1.7x faster than fp32 ones."""
    return jnp.bfloat16


def load_model(
    name_or_path: str,
    *,
    dtype: Any = None,
    stacked: bool | None = None,
    mesh_config: MeshConfig = MeshConfig(),
    skip: Callable[[str], bool] = lambda key: False,
    progress: bool = True,
) -> LoadedModel:
    """Loads a registry name, `.gguf` file, HF directory or hub id onto a device mesh.

    Args:
        name_or_path: what to load (see `t2jax.checkpoints.load_checkpoint`).
        dtype: parameter dtype; defaults to `default_dtype()`.
        stacked: layer layout (see `t2jax.model`); defaults to the faster one on the mesh's
            devices.
        mesh_config: the device mesh; weights are FSDP/tensor-sharded on it. Without a shape,
            `t2jax.plan.rules.default_mesh_shape` picks one for the model and the devices' memory.
        skip: per-layer kernel keys to leave out (e.g. SVF targets once factored).
        progress: show progress while loading.
    """
    checkpoint = load_checkpoint(name_or_path, progress=progress)
    dtype = dtype or default_dtype()
    if mesh_config.shape is None:
        devices = jax.devices()
        shape = plan_rules.default_mesh_shape(
            checkpoint.config, len(devices), plan_hardware.device_hbm_gib(devices[0]), dtype
        )
        mesh_config = dataclasses.replace(mesh_config, shape=shape)
    mesh = parallel.make_mesh(mesh_config)
    rules = parallel.ShardingRules()
    if stacked is None:
        stacked = model_lib.default_layout_is_stacked(mesh)

    def place(key: str, array: np.ndarray) -> jax.Array:
        return jax.device_put(array, parallel.weight_sharding(key, array.shape, mesh, rules))

    weights = weights_from_hf(
        checkpoint.config,
        checkpoint.tensors,
        dtype=dtype,
        stacked=stacked,
        skip=skip,
        place=place,
        progress=progress,
    )
    return LoadedModel(
        config=checkpoint.config,
        weights=weights,
        tokenizer=checkpoint.tokenizer,
        eos_ids=checkpoint.eos_token_ids,
        mesh=mesh,
        checkpoint=checkpoint,
    )


def load_model_section(
    section: ModelSection,
    *,
    skip: Callable[[str], bool] = lambda key: False,
    progress: bool = True,
) -> LoadedModel:
    """`load_model` with the settings of a run config's model section (name, dtype, layout,
    mesh)."""
    dtype = None if section.dtype is None else jnp.dtype(section.dtype)
    return load_model(
        section.name,
        dtype=dtype,
        stacked=section.stacked,
        mesh_config=section.mesh,
        skip=skip,
        progress=progress,
    )

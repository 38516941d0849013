"""The cheap default rules that runs use on an accelerator when the user sets nothing: the mesh
(`default_mesh_shape`, used by `t2jax.loading.load_model`) and the RL microbatch and remat
(`default_rl_memory` through `resolve_rl`, used by training). An explicit setting always wins;
CPU runs keep their defaults. `t2jax.plan.search` checks these rules by compiling the programs.

This module imports none of the programs (nor the RL package), so the modules that run them,
and the loader, can import it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from t2jax import parallel
from t2jax.config import ModelConfig
from t2jax.plan.hardware import GIB, device_hbm_gib
from t2jax.plan.models import parameter_bytes
from t2jax.svf import targets as svf_targets

if TYPE_CHECKING:  # a type only: loading imports this module, and rl is above loading
    from t2jax.rl.config import RLConfig

# Share of a chip's HBM the weights may take before they are FSDP-sharded: the rest is for the
# KV cache, activations and the compiler's temporaries.
WEIGHT_SHARE = 0.4
# Share of HBM a plan may fill: XLA's estimate excludes fragmentation and runtime buffers.
USABLE_SHARE = 0.9
# Per-device bytes of one RL row per sequence position with remat, in units of the model width D:
# the residual stream each layer keeps for the backward pass, and one layer's recomputed
# activations (attention, the MLP's intermediate, a log-softmax chunk). Calibrated on compiles of
# Llama-3-8B on v5e-4 (1.8 GiB per row per chip at 1024 tokens) and Llama-3-70B on v5p-8 (4.7).
RL_KEPT_BYTES_PER_LAYER = 3
RL_WORKING_BYTES = 400
# Layers whose FSDP-gathered weights a sharded RL step holds at once (the compiler prefetches the
# next layers' weights: about 8 GiB for Llama-3-70B on 8 H100s, 1 GiB on v5p).
RL_GATHERED_LAYERS = 3


def default_mesh_shape(
    config: ModelConfig, num_devices: int, hbm_gib: float | None, dtype: Any = jnp.bfloat16
) -> tuple[int, int, int]:
    """(data, fsdp, tensor): weights replicated when they take at most `WEIGHT_SHARE` of a
    chip's HBM, else FSDP-sharded over the fewest devices (a power of two) that brings them
    under it; when even all devices do not, half of them shard the heads instead (tensor
    parallelism). CPU (`hbm_gib` None): all data-parallel."""
    if hbm_gib is None:
        return (num_devices, 1, 1)
    weights = parameter_bytes(config, dtype)
    fsdp = 1
    while fsdp < num_devices and weights / fsdp > WEIGHT_SHARE * hbm_gib * GIB:
        fsdp *= 2
    fsdp = math.gcd(fsdp, num_devices)
    still_large = weights / fsdp > WEIGHT_SHARE * hbm_gib * GIB
    if still_large and fsdp % 2 == 0 and config.num_kv_heads % 2 == 0:
        # Sharded over every chip and still large: split the heads too (tensor parallelism),
        # which halves the prefill's activations and leaves the weights' share unchanged.
        return (num_devices // fsdp, fsdp // 2, 2)
    return (num_devices // fsdp, fsdp, 1)


@dataclasses.dataclass(frozen=True)
class RLMemory:
    """RL gradient-step settings: rows per microbatch and whether to recompute activations."""

    microbatch_size: int
    remat: bool


def default_rl_memory(
    config: ModelConfig,
    mesh: jax.sharding.Mesh,
    hbm_gib: float,
    sequence_length: int,
    batch_size: int,
    targets: Sequence[str] = ("mlp",),
) -> RLMemory:
    """Remat on, and the largest microbatch (a multiple of the data-parallel size, at most the
    batch) whose activations fit the HBM the sharded weights and factors (and a few gathered
    layers, when sharded) leave free."""
    dtype_bytes = 2
    data_parallel = parallel.data_parallel_size(mesh)
    keys = svf_targets.resolve_targets(targets)
    factor_count = sum(
        sum(svf_targets.kernel_shape(config, key)) * min(svf_targets.kernel_shape(config, key))
        for key in keys
    )
    dense_count = sum(math.prod(svf_targets.kernel_shape(config, key)) for key in keys)
    static = (
        parameter_bytes(config) + config.num_layers * (factor_count - dense_count) * dtype_bytes
    )
    fsdp = mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1)
    gathered = RL_GATHERED_LAYERS * parameter_bytes(config) / config.num_layers if fsdp > 1 else 0
    free = USABLE_SHARE * hbm_gib * GIB - static / fsdp - gathered
    width_bytes = RL_KEPT_BYTES_PER_LAYER * config.num_layers + RL_WORKING_BYTES
    per_row = sequence_length * config.hidden_size * width_bytes
    rows_per_device = max(1, int(free // per_row)) if free > 0 else 1
    size = min(rows_per_device * data_parallel, batch_size)
    size = max(data_parallel, size // data_parallel * data_parallel)
    return RLMemory(microbatch_size=size, remat=True)


def resolve_rl(
    rl: RLConfig,
    config: ModelConfig,
    mesh: jax.sharding.Mesh,
    sequence_length: int,
    targets: Sequence[str],
) -> RLConfig:
    """`rl` with `microbatch_size` and `remat` filled in where they are None: on TPU/GPU with
    `default_rl_memory`, on CPU as before (the whole batch at once, no remat). Explicit
    settings are kept."""
    hbm = device_hbm_gib(mesh.devices.flat[0])
    if hbm is None:
        return dataclasses.replace(rl, remat=bool(rl.remat))
    rows = rl.batch_size * rl.samples_per_prompt
    default = default_rl_memory(config, mesh, hbm, sequence_length, rows, targets)
    return dataclasses.replace(
        rl,
        microbatch_size=rl.microbatch_size or default.microbatch_size,
        remat=default.remat if rl.remat is None else rl.remat,
    )

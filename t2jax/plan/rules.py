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
# Per-device bytes of one RL row per sequence position with remat, in units of the model
# width D (the kept residual stream of every layer plus one layer's recomputed activations);
# calibrated on Llama-3-8B / v5e-4 compiles (about 1.8 GiB per row per chip at 1024 tokens).
RL_BYTES_PER_POSITION_PER_WIDTH = 512


def default_mesh_shape(
    config: ModelConfig, num_devices: int, hbm_gib: float | None, dtype: Any = jnp.bfloat16
) -> tuple[int, int, int]:
    """(data, fsdp, tensor): weights replicated when they take at most `WEIGHT_SHARE` of a
    chip's HBM, else FSDP-sharded over the fewest devices (a power of two) that brings them
    under it (all devices when none does). CPU (`hbm_gib` None): all data-parallel."""
    if hbm_gib is None:
        return (num_devices, 1, 1)
    weights = parameter_bytes(config, dtype)
    fsdp = 1
    while fsdp < num_devices and weights / fsdp > WEIGHT_SHARE * hbm_gib * GIB:
        fsdp *= 2
    fsdp = math.gcd(fsdp, num_devices)
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
    batch) whose activations fit the HBM the sharded weights and factors leave free."""
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
    free = USABLE_SHARE * hbm_gib * GIB - static / max(fsdp, 1)
    per_row = sequence_length * config.hidden_size * RL_BYTES_PER_POSITION_PER_WIDTH
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

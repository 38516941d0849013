"""Device mesh, logical-axis sharding rules and multi-host helpers. No `pmap` anywhere.

Weights are placed with `NamedSharding`s derived from one rules table that maps logical axis names
to mesh axes; `jax.jit` propagates shardings through the computation. Batches are sharded over the
data-parallel axes ("data" and "fsdp"), the base weights FSDP-style over "fsdp" (and "tensor").
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from t2jax.config import MeshConfig
from t2jax.configuration import ConfigError

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (or None for replicated)."""

    batch: tuple[str, ...] = BATCH_AXES
    embed: str | None = "fsdp"
    heads: str | None = "tensor"
    mlp: str | None = "tensor"
    vocab: str | None = "tensor"
    rank: str | None = None


# Logical axes of each weight leaf, by key (per-layer keys get a leading unsharded L axis when
# stacked).
_LOGICAL_AXES = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": (None,),
    "self_attn.q_proj": ("embed", "heads"),
    "self_attn.k_proj": ("embed", "heads"),
    "self_attn.v_proj": ("embed", "heads"),
    "self_attn.o_proj": ("heads", "embed"),
    "mlp.gate_proj": ("embed", "mlp"),
    "mlp.up_proj": ("embed", "mlp"),
    "mlp.down_proj": ("mlp", "embed"),
}


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> jax.sharding.Mesh:
    """Builds a mesh over all (or the given) devices; one axis of size -1 takes the rest (no
    shape: all devices data-parallel; `t2jax.loading.load_model` picks one for the model)."""
    devices = list(jax.devices() if devices is None else devices)
    requested = config.shape or (-1,) + (1,) * (len(config.axis_names) - 1)
    fixed = math.prod(size for size in requested if size != -1)
    if len(devices) % fixed:
        raise ConfigError(f"mesh shape {requested} does not divide {len(devices)} devices")
    shape = tuple(len(devices) // fixed if size == -1 else size for size in requested)
    if math.prod(shape) != len(devices):
        raise ConfigError(
            f"mesh shape {shape} needs {math.prod(shape)} devices, have {len(devices)}"
        )
    return jax.make_mesh(
        shape,
        config.axis_names,
        axis_types=(AxisType.Auto,) * len(shape),
        devices=devices,
    )


def _mesh_size(mesh: jax.sharding.Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape.get(name, 1) for name in names)


def logical_to_spec(
    logical: tuple[str | None, ...], shape: tuple[int, ...], mesh, rules: ShardingRules
) -> PartitionSpec:
    """PartitionSpec for an array with the given logical axes; a dimension that the mesh axis size
    does not divide is replicated instead, and a mesh axis is used at most once."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape, strict=True):
        axes = getattr(rules, name) if name else None
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(n for n in names if n in mesh.shape and n not in used)
        if not names or dim % _mesh_size(mesh, names):
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def weight_sharding(
    key: str, shape: tuple[int, ...], mesh, rules: ShardingRules = ShardingRules()
) -> NamedSharding:
    """Sharding of a weight leaf named `key` (a `Weights` field or per-layer HF module key)."""
    logical = _LOGICAL_AXES.get(key, (None,) * len(shape))
    logical = (None,) * (len(shape) - len(logical)) + tuple(logical)  # leading L axis, if any
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, rules))


def batch_sharding(mesh, rules: ShardingRules = ShardingRules()) -> NamedSharding:
    """Sharding of [B, ...] batch arrays: B split over the data-parallel axes."""
    axes = tuple(name for name in rules.batch if name in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def data_parallel_size(mesh, rules: ShardingRules = ShardingRules()) -> int:
    """Number of batch shards: batches are padded to a multiple of this."""
    return _mesh_size(mesh, tuple(name for name in rules.batch if name in mesh.shape))


def replicated(mesh) -> NamedSharding:
    """Fully replicated sharding (small trees such as SVF vectors)."""
    return NamedSharding(mesh, PartitionSpec())


def maybe_initialize_distributed(force: bool = False) -> bool:
    """Calls `jax.distributed.initialize()` when asked (`T2JAX_DISTRIBUTED=1` or `force`) or when a
    multi-host cluster is detected; must run before anything touches devices. Returns whether it
    initialized."""
    requested = force or os.environ.get("T2JAX_DISTRIBUTED") == "1"
    detected = (
        any(
            var in os.environ
            for var in ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS")
        )
        and int(os.environ.get("SLURM_NTASKS", "2")) > 1
    )
    if not (requested or detected):
        return False
    jax.distributed.initialize()
    return True


def is_main_process() -> bool:
    """Process 0 logs and writes files."""
    return jax.process_index() == 0


def host_array(x) -> np.ndarray:
    """A fully addressable copy of a (possibly sharded) array on the host."""
    return np.asarray(jax.device_get(x))

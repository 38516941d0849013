"""The chips plans are made for: named TPU topologies (compile-only devices from `libtpu`, the
`aot` extra) and the HBM of one chip, for compile targets and for real devices."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from t2jax.configuration import ConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Topology:
    """A compile target: `get_topology_desc` arguments and the HBM of one chip."""

    topology_name: str
    hbm_gib: float
    chip_config_name: str | None = None


# Chips, not cores: v4/v5p "megacore" chips count as one device.
TOPOLOGIES = {
    "v5e-4": Topology("v5e:2x2", 16),
    "v5e-8": Topology("v5e:2x4", 16),
    "v5e-16": Topology("v5e:4x4", 16),
    "v6e-4": Topology("v6e:2x2", 32),
    "v6e-8": Topology("v6e:2x4", 32),
    "v5p-8": Topology("v5p:2x2x1", 95, "megacore"),
    "v4-8": Topology("v4:2x2x1", 32, "megacore"),
}

# HBM per chip by `device_kind`, for runs on real devices (compile-only devices report none).
HBM_GIB_BY_KIND = {
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5e": 16,
    "TPU v5": 95,
    "TPU v5p": 95,
    "TPU v6 lite": 32,
    "TPU v6e": 32,
    "NVIDIA H100 80GB HBM3": 80,
    "NVIDIA H200": 141,
    "NVIDIA A100-SXM4-80GB": 80,
}


def topology_devices(name: str) -> tuple[list[Any], float]:
    """Compile-only devices of a named topology (`TOPOLOGIES`) and the HBM GiB of one chip.

    Raises:
        ConfigError: an unknown topology, or libtpu is not installed (`pip install .[aot]`).
    """
    if name not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    # Compile-only devices use no chip: let several processes (tests, plans) load libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topology = TOPOLOGIES[name]
    kwargs = {"chip_config_name": topology.chip_config_name} if topology.chip_config_name else {}
    try:
        description = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.topology_name, **kwargs
        )
    except RuntimeError as error:
        raise ConfigError(
            f"cannot create TPU topology {name} ({error}); install libtpu: pip install '.[aot]'"
        ) from None
    return list(description.devices), topology.hbm_gib


def device_hbm_gib(device: Any) -> float | None:
    """HBM GiB of a real device (its memory stats, else `HBM_GIB_BY_KIND`); None on CPU."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # compile-only devices and some plugins have no stats
        stats = {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] / GIB
    return HBM_GIB_BY_KIND.get(device.device_kind)

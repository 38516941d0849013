"""The chips plans are made for: named TPU and GPU topologies (compile-only devices from `libtpu`
and jax's CUDA plugin, the `aot` extra) and the HBM of one chip, for compile targets and for real
devices.

The TPU compiler rejects a program over HBM; the GPU compiler does not, so a GPU plan's verdict
is its `memory_analysis()` against HBM alone.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from t2jax.configuration import ConfigError

GIB = 1024**3


GPU_SPECS = pathlib.Path(__file__).with_name("gpu_specs")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A compile target: `get_topology_desc` arguments and the HBM of one chip.

    Attributes:
        topology_name: TPU topology ("v5e:2x2"), or for GPUs the (slices x hosts x devices)
            shape ("1x1x8").
        hbm_gib: HBM of one chip.
        chip_config_name: TPU chip configuration ("megacore" counts v4/v5p chips, not cores).
        gpu_spec: for GPUs, the device description in `gpu_specs/` (None for TPUs).
    """

    topology_name: str
    hbm_gib: float
    chip_config_name: str | None = None
    gpu_spec: str | None = None

    @property
    def platform(self) -> str:
        """ "tpu" or "cuda"."""
        return "tpu" if self.gpu_spec is None else "cuda"


# Chips, not cores: v4/v5p "megacore" chips count as one device.
TOPOLOGIES = {
    "v5e-4": Topology("v5e:2x2", 16),
    "v5e-8": Topology("v5e:2x4", 16),
    "v5e-16": Topology("v5e:4x4", 16),
    "v6e-4": Topology("v6e:2x2", 32),
    "v6e-8": Topology("v6e:2x4", 32),
    "v5p-8": Topology("v5p:2x2x1", 95, "megacore"),
    "v4-8": Topology("v4:2x2x1", 32, "megacore"),
    "h100x1": Topology("1x1x1", 79.1, gpu_spec="h100_sxm.txtpb"),
    "h100x8": Topology("1x1x8", 79.1, gpu_spec="h100_sxm.txtpb"),
    "h200x8": Topology("1x1x8", 140.4, gpu_spec="h200_sxm.txtpb"),
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
    "NVIDIA H100 80GB HBM3": 79.1,
    "NVIDIA H200": 140.4,
    "NVIDIA A100-SXM4-80GB": 80,
}


def topology_devices(name: str) -> tuple[list[Any], float]:
    """Compile-only devices of a named topology (`TOPOLOGIES`) and the HBM GiB of one chip
    (for GPUs, the share JAX may allocate: `gpu_memory_fraction`).

    Raises:
        ConfigError: an unknown topology, or its compiler plugin is not installed
            (`pip install '.[aot]'`).
    """
    if name not in TOPOLOGIES:
        raise ConfigError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    from jax.experimental import topologies

    topology = TOPOLOGIES[name]
    if topology.platform == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
        # Compile-only devices use no chip: let several processes (tests, plans) load libtpu.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        kwargs = {"topology_name": topology.topology_name}
        if topology.chip_config_name:
            kwargs["chip_config_name"] = topology.chip_config_name
    else:
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no CUDA libraries here
        kwargs = {
            "topology_name": "",
            "topology": topology.topology_name,
            "target_config": (GPU_SPECS / topology.gpu_spec).read_text(),
        }
    try:
        description = topologies.get_topology_desc(platform=topology.platform, **kwargs)
    except (RuntimeError, ValueError) as error:
        plugin = "libtpu" if topology.platform == "tpu" else "jax-cuda12-plugin"
        raise ConfigError(
            f"cannot create the {name} topology ({error}); install {plugin}: pip install '.[aot]'"
        ) from None
    hbm = (
        topology.hbm_gib if topology.platform == "tpu" else topology.hbm_gib * gpu_memory_fraction()
    )
    return list(description.devices), hbm


def gpu_memory_fraction() -> float:
    """Share of a GPU's memory JAX's allocator may use: XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75
    unless set (the rest is left to CUDA and its libraries)."""
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))


def device_hbm_gib(device: Any) -> float | None:
    """HBM GiB a real device's allocator may use (its memory stats, else `HBM_GIB_BY_KIND`, for
    GPUs times `gpu_memory_fraction`); None on CPU."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # compile-only devices and some plugins have no stats
        stats = {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] / GIB
    hbm = HBM_GIB_BY_KIND.get(device.device_kind)
    if hbm is None or device.platform == "tpu":
        return hbm
    return hbm * gpu_memory_fraction()

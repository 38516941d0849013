"""Ahead-of-time planning: compile t2jax's real programs for TPU chips from any host, and choose
the mesh, RL microbatch and remat that fit their memory.

`jax.experimental.topologies.get_topology_desc` (with `libtpu` installed, the `aot` extra) gives
compile-only TPU devices on a CPU host (`t2jax.plan.hardware`). `plan` lowers the programs with
abstract arguments (`t2jax.plan.programs`) and compiles them for that topology with the default
mesh and RL settings (`t2jax.plan.rules`, what runs use when the user sets nothing), and when the
RL step does not fit searches for settings that do. The paper's models need no weights
(`t2jax.plan.models`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from t2jax import parallel
from t2jax.config import MeshConfig
from t2jax.configuration import ConfigError
from t2jax.plan.hardware import topology_devices
from t2jax.plan.models import model_config
from t2jax.plan.programs import PROGRAMS, ProgramMemory, Programs, Workload, measure
from t2jax.plan.rules import USABLE_SHARE, RLMemory, default_mesh_shape, default_rl_memory

DEFAULT_WORKLOAD = Workload()  # the paper's shapes (`Workload`'s defaults)


def _rl_search(
    programs: Programs, mode: str, memory: RLMemory, hbm: float, explicit: bool
) -> list[ProgramMemory]:
    """Compiles the RL step at `memory`; when it does not fit (and was not set explicitly),
    halves the microbatch down to the data-parallel size, then turns remat on."""
    data_parallel = parallel.data_parallel_size(programs.mesh)
    tried = []
    while True:
        settings = dataclasses.asdict(memory)
        result, _ = measure(f"rl_{mode}", lambda m=memory: programs.rl_step(mode, m), hbm, settings)
        tried.append(result)
        if result.fits or explicit:
            return tried
        if memory.microbatch_size > data_parallel:
            smaller = max(
                data_parallel, memory.microbatch_size // 2 // data_parallel * data_parallel
            )
            memory = dataclasses.replace(memory, microbatch_size=smaller)
        elif not memory.remat:
            memory = dataclasses.replace(memory, remat=True)
        else:
            return tried


def plan(
    model: str,
    topology: str,
    workload: Workload = DEFAULT_WORKLOAD,
    *,
    mesh_shape: tuple[int, ...] | None = None,
    rl_memory: RLMemory | None = None,
    programs: Sequence[str] = PROGRAMS,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Compiles `programs` of `model` for `topology` with the default (or given) mesh and RL
    settings, searching smaller RL microbatches / remat when the step does not fit.

    Args:
        model: a `PAPER_MODELS` name, registry name, HF directory or hub id.
        topology: a `TOPOLOGIES` name.
        workload: the shapes to compile for.
        mesh_shape: (data, fsdp, tensor) to check instead of `default_mesh_shape`.
        rl_memory: RL microbatch/remat to check instead of `default_rl_memory` (no search).
        programs: a subset of `PROGRAMS`.
        log: called with one line per compiled program.

    Returns:
        A JSON-ready dict: model, topology, HBM, mesh, workload, the chosen RL settings and one
        record per compiled program (per-device GiB, fits, compile seconds, settings).

    Raises:
        ConfigError: an unknown topology or program, or a mesh that does not fit the devices.
    """
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ConfigError(f"unknown program(s) {unknown}; known: {', '.join(PROGRAMS)}")
    config = model_config(model)
    devices, hbm = topology_devices(topology)
    usable = USABLE_SHARE * hbm
    shape = mesh_shape or default_mesh_shape(config, len(devices), hbm, workload.dtype)
    mesh = parallel.make_mesh(MeshConfig(shape=tuple(shape)), devices=devices)
    shape = tuple(mesh.shape[name] for name in mesh.axis_names)
    compiler = Programs(config, mesh, workload)
    memory = rl_memory or default_rl_memory(
        config, mesh, hbm, workload.rl_sequence, workload.rl_batch, (workload.targets,)
    )
    results: list[ProgramMemory] = []

    def record(result: ProgramMemory) -> None:
        results.append(result)
        log(_format_row(result, usable))

    compiled_prefill = None
    if {"prefill", "decode", "factored_decode"} & set(programs):
        result, compiled_prefill = measure("prefill", compiler.prefill, usable)
        if "prefill" in programs:
            record(result)
        compiler.decode_state(compiled_prefill)
    for name in ("decode", "factored_decode", "merge"):
        if name in programs:
            record(measure(name, getattr(compiler, name), usable)[0])
    chosen = memory
    for mode in ("merged", "factored"):
        if f"rl_{mode}" not in programs:
            continue
        tried = _rl_search(compiler, mode, memory, usable, rl_memory is not None)
        for result in tried:
            record(result)
        if tried[-1].fits:
            fitted = RLMemory(**tried[-1].settings)
            chosen = min(chosen, fitted, key=lambda m: (m.microbatch_size, not m.remat))
    return {
        "model": model,
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "hbm_gib": hbm,
        "usable_gib": round(usable, 2),
        "mesh": dict(zip(mesh.axis_names, shape, strict=True)),
        "workload": dataclasses.asdict(workload),
        "rl": dataclasses.asdict(chosen),
        "default_rl": dataclasses.asdict(memory),
        "fits": all(r.fits for r in {r.program: r for r in results}.values()),
        "programs": [dataclasses.asdict(r) for r in results],
    }


def _format_row(result: ProgramMemory, usable: float) -> str:
    """One table line: program, per-device GiB (arguments + temporaries = total), fit, time."""

    def gib(value: float | None) -> str:
        return "?" if value is None else f"{value:.2f}"

    settings = " ".join(f"{k}={v}" for k, v in result.settings.items())
    verdict = "fits" if result.fits else "DOES NOT FIT"
    return (
        f"{result.program:16s} args {gib(result.arguments_gib):>6s}  temp "
        f"{gib(result.temporaries_gib):>6s}  total {gib(result.total_gib):>6s} / "
        f"{usable:.1f} GiB  {verdict:12s} {result.compile_seconds:6.0f} s  {settings}"
    )


def write_plan(result: dict[str, Any] | list[dict[str, Any]], path: str) -> None:
    """Writes a plan (or a list of plans) as indented JSON."""
    with open(path, "w") as file:
        json.dump(result, file, indent=1)
        file.write("\n")


def scaling_table(plans: Sequence[dict[str, Any]]) -> str:
    """A Markdown table (model x topology x program: per-device GiB, mesh, RL settings) of
    plans, for the README's Scaling section."""
    lines = [
        "| model | topology | mesh (data, fsdp, tensor) | program | per-device GiB | fits |",
        "|---|---|---|---|---|---|",
    ]
    for result in plans:
        mesh = ",".join(str(v) for v in result["mesh"].values())
        for program in result["programs"]:
            total = program["total_gib"]
            settings = program["settings"]
            extra = (
                f" (microbatch {settings['microbatch_size']}, remat {settings['remat']})"
                if settings
                else ""
            )
            lines.append(
                f"| {result['model']} | {result['topology']} | {mesh} | {program['program']}"
                f"{extra} | {'?' if total is None else f'{total:.1f}'} / {result['hbm_gib']} | "
                f"{'yes' if program['fits'] else 'no'} |"
            )
    return "\n".join(lines)

"""Ahead-of-time planning: compile t2jax's real programs for TPU chips from any host, and choose
the mesh, RL microbatch and remat that fit their memory.

`jax.experimental.topologies.get_topology_desc` (with `libtpu` and jax's CUDA plugin installed,
the `aot` extra) gives compile-only TPU and GPU devices on a CPU host (`t2jax.plan.hardware`).
`plan` lowers the programs with abstract arguments (`t2jax.plan.programs`) and compiles them for
that topology with the default mesh and RL settings (`t2jax.plan.rules`, what runs use when the
user sets nothing). When a sampling program does not fit it tries tensor parallelism, then fewer
rows per sampler call; when the RL step does not fit, smaller microbatches, then remat. The
paper's models need no weights (`t2jax.plan.models`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from t2jax import parallel
from t2jax.config import MeshConfig
from t2jax.configuration import ConfigError
from t2jax.files import write_json_atomically
from t2jax.plan.hardware import GIB, topology_devices
from t2jax.plan.models import model_config, parameter_bytes
from t2jax.plan.programs import PROGRAMS, ProgramMemory, Programs, Workload, measure
from t2jax.plan.rules import USABLE_SHARE, RLMemory, default_mesh_shape, default_rl_memory

DEFAULT_WORKLOAD = Workload()  # the paper's shapes (`Workload`'s defaults)
SAMPLING_PROGRAMS = ("prefill", "decode", "factored_decode", "merge")


def _sampling_candidates(
    shape: tuple[int, int, int], num_kv_heads: int, batch: int
) -> list[tuple[tuple[int, int, int], int]]:
    """(mesh, rows per sampler call) to try, in order: the default; the FSDP axis traded for
    tensor parallelism (x2, x4, ... where the kv heads divide); then halved rows on the last
    mesh, down to its data-parallel size."""
    data, fsdp, tensor = shape
    candidates = [(shape, batch)]
    while fsdp % 2 == 0 and num_kv_heads % (tensor * 2) == 0:
        fsdp, tensor = fsdp // 2, tensor * 2
        candidates.append(((data, fsdp, tensor), batch))
    rows = batch
    while rows // 2 >= data * fsdp:
        rows //= 2
        candidates.append(((data, fsdp, tensor), rows))
    return candidates


def _compile_sampling(
    compiler: Programs, programs: Sequence[str], usable: float, settings: dict[str, Any]
) -> list[ProgramMemory]:
    """Compiles the sampling `programs` (the decode loops need the prefill's output state,
    which the prefill's compile gives once per `Programs`)."""
    results = []
    needs_state = {"decode", "factored_decode"} & set(programs) and not compiler.has_decode_state
    if "prefill" in programs or needs_state:
        result, compiled_prefill = measure("prefill", compiler.prefill, usable, settings)
        if "prefill" in programs:
            results.append(result)
        compiler.decode_state(compiled_prefill)
    for name in ("decode", "factored_decode", "merge"):
        if name in programs:
            results.append(measure(name, getattr(compiler, name), usable, settings)[0])
    return results


def _sampling_search(
    config: Any,
    devices: list[Any],
    shape: tuple[int, int, int],
    workload: Workload,
    programs: Sequence[str],
    usable: float,
    explicit: bool,
    record: Callable[[ProgramMemory], None],
) -> Programs:
    """Compiles the prefill and decode loop with the default mesh and rows; when one does not
    fit (and the mesh was not given), tries `_sampling_candidates` until both fit. The factored
    decode and the merge (which fewer rows do not shrink) are compiled once, at the settings
    found. Every compile goes to `record`; returns the `Programs` of those settings."""
    searched = [name for name in ("prefill", "decode") if name in programs]
    candidates = _sampling_candidates(shape, config.num_kv_heads, workload.batch)
    for mesh_shape, rows in candidates[:1] if explicit else candidates:
        mesh = parallel.make_mesh(MeshConfig(shape=mesh_shape), devices=devices)
        compiler = Programs(config, mesh, dataclasses.replace(workload, batch=rows))
        settings = {"mesh": list(mesh_shape), "batch": rows}
        results = _compile_sampling(compiler, searched, usable, settings)
        for result in results:
            record(result)
        if all(result.fits for result in results):
            break
    others = [name for name in ("factored_decode", "merge") if name in programs]
    for result in _compile_sampling(compiler, others, usable, settings):
        record(result)
    return compiler


def _rl_search(
    programs: Programs,
    mode: str,
    memory: RLMemory,
    hbm: float,
    explicit: bool,
    record: Callable[[ProgramMemory], None],
) -> RLMemory | None:
    """Compiles the RL step at `memory`; when it does not fit (and was not set explicitly),
    halves the microbatch down to the data-parallel size, then turns remat on. Every compile
    goes to `record`; returns the settings that fit (None when none does)."""
    data_parallel = parallel.data_parallel_size(programs.mesh)
    while True:
        settings = dataclasses.asdict(memory)
        result, _ = measure(f"rl_{mode}", lambda m=memory: programs.rl_step(mode, m), hbm, settings)
        record(result)
        if result.fits:
            return memory
        if explicit:
            return None
        if memory.microbatch_size > data_parallel:
            smaller = max(
                data_parallel, memory.microbatch_size // 2 // data_parallel * data_parallel
            )
            memory = dataclasses.replace(memory, microbatch_size=smaller)
        elif not memory.remat:
            memory = dataclasses.replace(memory, remat=True)
        else:
            return None


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
    settings; where a sampling program does not fit, searches tensor parallelism and fewer rows
    per call (`_sampling_candidates`), where the RL step does not, smaller microbatches and remat.

    Args:
        model: a `PAPER_MODELS` name, registry name, HF directory or hub id.
        topology: a `TOPOLOGIES` name.
        workload: the shapes to compile for.
        mesh_shape: (data, fsdp, tensor) to check instead of `default_mesh_shape`.
        rl_memory: RL microbatch/remat to check instead of `default_rl_memory` (no search).
        programs: a subset of `PROGRAMS`.
        log: called with one line per compiled program.

    Returns:
        A JSON-ready dict: model, topology, HBM, the chosen mesh (and the default one), the
        workload with the chosen rows per sampler call, the chosen RL settings (and the
        default ones), whether every program's last try fits, and one record per compile
        (per-device GiB, fits, compile seconds, settings).

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
    default_mesh = parallel.make_mesh(MeshConfig(shape=tuple(shape)), devices=devices)
    shape = tuple(default_mesh.shape.values())  # -1 resolved, checked against the devices
    results: list[ProgramMemory] = []

    def record(result: ProgramMemory) -> None:
        results.append(result)
        log(_format_row(result, usable))

    # Weights that exceed the chips even sharded over all of them: no setting can help.
    weights_per_chip = parameter_bytes(config, workload.dtype) / len(devices) / GIB
    hopeless = weights_per_chip > usable
    sampling = [name for name in SAMPLING_PROGRAMS if name in programs]
    compiler = _sampling_search(
        config,
        devices,
        shape,
        workload,
        sampling,
        usable,
        mesh_shape is not None or hopeless,
        record,
    )
    mesh = compiler.mesh
    memory = rl_memory or default_rl_memory(
        config, mesh, hbm, workload.rl_sequence, workload.rl_batch, (workload.targets,)
    )
    chosen = memory
    for mode in ("merged", "factored"):
        if f"rl_{mode}" in programs:
            explicit = rl_memory is not None or hopeless
            fitted = _rl_search(compiler, mode, memory, usable, explicit, record)
            if fitted is not None:
                chosen = min(chosen, fitted, key=lambda m: (m.microbatch_size, not m.remat))
    return {
        "model": model,
        "topology": topology,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "hbm_gib": round(hbm, 2),
        "usable_gib": round(usable, 2),
        "weights_per_chip_gib": round(weights_per_chip, 2),
        "mesh": dict(mesh.shape),
        "default_mesh": dict(default_mesh.shape),
        "workload": dataclasses.asdict(compiler.workload),
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
    """Writes a plan (or a list of plans) as indented JSON, atomically."""
    write_json_atomically(path, result)


def _program_label(program: dict[str, Any]) -> str:
    """A program and its settings: "prefill, 32 rows" or "rl_merged, microbatch 16, remat"."""
    settings = program["settings"]
    if "microbatch_size" in settings:
        remat = ", remat" if settings["remat"] else ""
        return f"{program['program']}, microbatch {settings['microbatch_size']}{remat}"
    return f"{program['program']}, {settings['batch']} rows"


def scaling_table(plans: Sequence[dict[str, Any]]) -> str:
    """A Markdown table (model x topology x program: mesh, per-chip GiB as arguments +
    temporaries, fits, compile seconds) of every compile of `plans`, for the README."""
    lines = [
        "| model | topology | mesh (data, fsdp, tensor) | program | per-chip GiB (args + temp) "
        "/ HBM | fits | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in plans:
        for program in result["programs"]:
            mesh = program["settings"].get("mesh") or list(result["mesh"].values())
            lines.append(
                f"| {result['model']} | {result['topology']} | {','.join(map(str, mesh))} | "
                f"{_program_label(program)} | {_memory_cell(program)} / {result['hbm_gib']} | "
                f"{'yes' if program['fits'] else 'no'} | {program['compile_seconds']:.0f} |"
            )
    return "\n".join(lines)


def _memory_cell(program: dict[str, Any]) -> str:
    """Total (arguments + temporaries) GiB as "11.6 (4.5 + 7.1)", or what a refused compile
    said it needed ("> 22.7": its temporaries alone)."""
    total, arguments, temporaries = (
        program["total_gib"],
        program["arguments_gib"],
        program["temporaries_gib"],
    )
    if arguments is not None:
        return f"{total:.1f} ({arguments:.1f} + {temporaries:.1f})"
    if total is not None:
        return f"{total:.1f}"
    return "?" if temporaries is None else f"> {temporaries:.1f}"

"""Ahead-of-time planning: compile t2jax's real programs for TPU chips from any host, and choose
the mesh, RL microbatch and remat that fit their memory.

`jax.experimental.topologies.get_topology_desc` (with `libtpu` installed, the `aot` extra) gives
compile-only TPU devices on a CPU host. The very jitted functions that `t2jax train/adapt/eval/
generate` run (`sampler.prefill`, `sampler.decode`, `svd.merge_kernels`,
`reinforce.compute_gradients`) are lowered with abstract arguments (`jax.ShapeDtypeStruct`s with
shardings, nothing materialized) and compiled for that topology: the TPU compiler rejects a program
that exceeds HBM (RESOURCE_EXHAUSTED), and `memory_analysis()` gives the per-device bytes of the
arguments, outputs and temporaries of one that fits.

`default_mesh_shape` and `default_rl_memory` are the cheap rules that runs use on an accelerator
when the user sets nothing (an explicit setting always wins; CPU runs keep their defaults);
`plan` compiles them, and when a program does not fit searches for settings that do.

Paper models that need no weights: `PAPER_MODELS` holds their HF configs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from t2jax import model as model_lib
from t2jax import padding, parallel, sampler
from t2jax.config import ConfigError, MeshConfig, ModelConfig
from t2jax.rl import trainer as reinforce
from t2jax.rl.config import RLConfig
from t2jax.svf import core as svf_lib
from t2jax.svf import factors as svd

GIB = 1024**3

# HF config.json contents (architecture keys) of the paper's models: plan without weights.
_LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    num_key_value_heads=8,
    tie_word_embeddings=False,
    max_position_embeddings=8192,
)
PAPER_MODELS: dict[str, dict[str, Any]] = {
    "Llama-3-8B-Instruct": dict(
        _LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
    ),
    "Llama-3-70B-Instruct": dict(
        _LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
    ),
    "Mistral-7B-Instruct-v0.3": dict(
        model_type="mistral",
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
    "Qwen2.5-7B-Instruct": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        sliding_window=131072,
        use_sliding_window=False,
        max_window_layers=28,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    ),
}


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

# Share of a chip's HBM the weights may take before they are FSDP-sharded: the rest is for the
# KV cache, activations and the compiler's temporaries.
WEIGHT_SHARE = 0.4
# Share of HBM a plan may fill: XLA's estimate excludes fragmentation and runtime buffers.
USABLE_SHARE = 0.9
# Per-device bytes of one RL row per sequence position with remat, in units of the model
# width D (the kept residual stream of every layer plus one layer's recomputed activations);
# calibrated on Llama-3-8B / v5e-4 compiles (about 1.8 GiB per row per chip at 1024 tokens).
RL_BYTES_PER_POSITION_PER_WIDTH = 512


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


def model_config(name: str) -> ModelConfig:
    """The architecture of a paper model name (no weights needed), registry name, HF directory
    or hub id."""
    if name in PAPER_MODELS:
        return ModelConfig.from_hf(PAPER_MODELS[name])
    from t2jax.checkpoints import load_checkpoint

    return load_checkpoint(name, progress=False).config


# ----------------------------------------------------------------------------------------------
# Default choices (cheap rules; `plan` checks them by compiling).


def parameter_bytes(config: ModelConfig, dtype: Any = jnp.bfloat16) -> int:
    """Bytes of the model's parameters in `dtype`."""
    count = sum(math.prod(shape) for shape in model_lib.expected_hf_shapes(config).values())
    return count * jnp.dtype(dtype).itemsize


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
    keys = svd.resolve_targets(targets)
    factor_count = sum(
        sum(svd.kernel_shape(config, key)) * min(svd.kernel_shape(config, key)) for key in keys
    )
    dense_count = sum(math.prod(svd.kernel_shape(config, key)) for key in keys)
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


# ----------------------------------------------------------------------------------------------
# Abstract arguments.


def _struct(shape: Sequence[int], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer key -> shape of one layer's leaf, in `x @ W` orientation."""
    hf = model_lib.expected_hf_shapes(config)
    shapes = {}
    for key, name in model_lib.hf_layer_tensor_names(config, 0).items():
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
        return _struct(shape, dtype, parallel.weight_sharding(key, shape, mesh))

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
) -> svd.ModelFactors:
    """Stacked full-rank SVD factors of the targets, sharded as `svd.checkpoint_factors`
    places them."""
    layers = {}
    for key in svd.resolve_targets(targets):
        fan_in, fan_out = svd.kernel_shape(config, key)
        rank = min(fan_in, fan_out)
        shapes = {
            "a": ((config.num_layers, fan_in, rank), dtype),
            "s": ((config.num_layers, rank), jnp.float32),
            "b": ((config.num_layers, rank, fan_out), dtype),
        }
        parts = {
            part: _struct(shape, part_dtype, svd.factor_sharding(key, part, shape, mesh))
            for part, (shape, part_dtype) in shapes.items()
        }
        layers[key] = svd.Factor(**parts)
    return svd.ModelFactors(layers=layers, fingerprint="plan")


def _replicated(shape: Sequence[int], dtype: Any, mesh: jax.sharding.Mesh):
    return _struct(shape, dtype, parallel.replicated(mesh))


def _batched(shape: Sequence[int], dtype: Any, mesh: jax.sharding.Mesh):
    return _struct(shape, dtype, parallel.batch_sharding(mesh))


def _z(factors: svd.ModelFactors, mesh: jax.sharding.Mesh, rows: int | None) -> dict[str, Any]:
    """Abstract z: [L, R] replicated (one expert) or [L, B, R] rows split like the batch."""
    layers = factors.num_layers
    if rows is None:
        return {k: _replicated((layers, r), jnp.float32, mesh) for k, r in factors.ranks().items()}
    spec = jax.sharding.PartitionSpec(None, parallel.batch_sharding(mesh).spec[0], None)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return {
        key: _struct((layers, rows, rank), jnp.float32, sharding)
        for key, rank in factors.ranks().items()
    }


# ----------------------------------------------------------------------------------------------
# Compiling the programs.


@dataclasses.dataclass
class ProgramMemory:
    """Per-device memory of one compiled program (GiB), or why it did not compile."""

    program: str
    fits: bool
    arguments_gib: float | None = None
    outputs_gib: float | None = None
    temporaries_gib: float | None = None
    total_gib: float | None = None
    compile_seconds: float = 0.0
    error: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


def _measure(
    program: str,
    lower: Callable[[], Any],
    hbm_gib: float,
    settings: dict[str, Any] | None = None,
) -> tuple[ProgramMemory, Any]:
    """Lowers and compiles one program; the TPU compiler raises RESOURCE_EXHAUSTED over HBM."""
    began = time.perf_counter()
    settings = settings or {}
    try:
        compiled = lower().compile()
    except Exception as error:  # XlaRuntimeError
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        used = re.search(r"Used ([0-9.]+)([GMK])", text)
        scale = {"G": 1, "M": 1 / 1024, "K": 1 / 1024**2}
        total = float(used.group(1)) * scale[used.group(2)] if used else None
        first_line = text.strip().splitlines()[0][:300]
        memory = ProgramMemory(
            program,
            False,
            total_gib=total,
            compile_seconds=time.perf_counter() - began,
            error=first_line,
            settings=settings,
        )
        return memory, None
    analysis = compiled.memory_analysis()
    arguments = analysis.argument_size_in_bytes / GIB
    outputs = analysis.output_size_in_bytes / GIB
    aliased = analysis.alias_size_in_bytes / GIB
    temporaries = analysis.temp_size_in_bytes / GIB
    total = arguments + outputs - aliased + temporaries
    memory = ProgramMemory(
        program,
        total <= hbm_gib,
        arguments_gib=round(arguments, 3),
        outputs_gib=round(outputs, 3),
        temporaries_gib=round(temporaries, 3),
        total_gib=round(total, 3),
        compile_seconds=round(time.perf_counter() - began, 1),
        settings=settings,
    )
    return memory, compiled


@dataclasses.dataclass(frozen=True)
class Workload:
    """The shapes a plan compiles for.

    Attributes:
        batch: decode rows (prompts per sampler call).
        prompt_length: prompt bucket of the prefill.
        max_new_tokens: decode budget (the cache holds prompt_length + this bucketed).
        rl_batch: rows of an RL gradient step (prompts x samples).
        rl_sequence: padded prompt + completion length of the RL teacher-forced pass.
        targets: SVF targets.
        dtype: parameter dtype.
    """

    batch: int = 32
    prompt_length: int = 1024
    max_new_tokens: int = 1024
    rl_batch: int = 256
    rl_sequence: int = 1024
    targets: str = "mlp"
    dtype: str = "bfloat16"


class Programs:
    """Lowers t2jax's jitted programs for a model on a mesh with abstract arguments."""

    def __init__(self, config: ModelConfig, mesh: jax.sharding.Mesh, workload: Workload):
        self.config, self.mesh, self.workload = config, mesh, workload
        self.dtype = jnp.dtype(workload.dtype)
        self.targets = svd.resolve_targets(workload.targets)
        self.rows = -(-workload.batch // parallel.data_parallel_size(mesh))
        self.rows *= parallel.data_parallel_size(mesh)
        self.weights = abstract_weights(config, mesh, self.dtype)
        self.factors = abstract_factors(config, mesh, self.dtype, self.targets)
        key = jax.eval_shape(lambda: jax.random.key(0))
        self.key = _replicated(key.shape, key.dtype, mesh)
        self.scalar = _replicated((), jnp.float32, mesh)
        self.eos = _replicated((2,), jnp.int32, mesh)
        self._state = None

    def _cache(self) -> model_lib.KVCache:
        length = self.workload.prompt_length + padding.new_tokens_bucket(
            self.workload.max_new_tokens
        )
        shapes = jax.eval_shape(
            lambda: model_lib.init_cache(self.config, self.rows, length, dtype=self.dtype)
        )
        shardings = sampler.cache_shardings(shapes, self.mesh)
        return jax.tree.map(lambda s, sh: _struct(s.shape, s.dtype, sh), shapes, shardings)

    def prefill(self):
        """`sampler.prefill` of a batch of prompt buckets into an empty cache."""
        shape = (self.rows, self.workload.prompt_length)
        return sampler.prefill.lower(
            self.config,
            self.weights,
            None,
            _batched(shape, jnp.int32, self.mesh),
            _batched(shape, bool, self.mesh),
            self._cache(),
            self.key,
            self.scalar,
            self.scalar,
            self.eos,
        )

    def decode_state(self, compiled_prefill: Any = None) -> sampler.DecodeState:
        """The abstract decode state the prefill returns (with its output shardings)."""
        if self._state is None:
            shapes = self.prefill().out_info
            shardings = (
                compiled_prefill.output_shardings
                if compiled_prefill is not None
                else jax.tree.map(lambda _: parallel.replicated(self.mesh), shapes)
            )
            self._state = jax.tree.map(
                lambda s, sh: _struct(s.shape, s.dtype, sh), shapes, shardings
            )
        return self._state

    def decode(self, svf: svf_lib.ModelSVF | None = None):
        """`sampler.decode`: the while loop over new tokens (needs `decode_state` first)."""
        stop = _replicated((), jnp.int32, self.mesh)
        return sampler.decode.lower(
            self.config,
            self.weights,
            svf,
            self.decode_state(),
            self.key,
            self.scalar,
            self.scalar,
            self.eos,
            stop,
        )

    def factored_decode(self):
        """`sampler.decode` with one expert per row (factored SVF, as `t2jax.adapt` runs it)."""
        z = _z(self.factors, self.mesh, self.rows)
        return self.decode(svd.svf_from_factors(self.factors, z, "factored"))

    def merge(self):
        """`svd.merge_kernels`: W'(z) of every target, as each rollout/evaluation does."""
        svf = svd.svf_from_factors(self.factors, _z(self.factors, self.mesh, None), "merged")
        return svd.merge_kernels.lower(svf.layers, self.dtype)

    def rl_step(self, mode: str, memory: RLMemory):
        """`reinforce.compute_gradients` on a batch of `rl_batch` rows (targets' dense kernels
        dropped, as training loads them)."""
        rows, count = reinforce.microbatch_layout(
            self.workload.rl_batch,
            memory.microbatch_size,
            parallel.data_parallel_size(self.mesh),
        )
        shape = (rows, self.workload.rl_sequence)
        batch = reinforce.PolicyBatch(
            tokens=_batched(shape, jnp.int32, self.mesh),
            token_mask=_batched(shape, bool, self.mesh),
            completion_mask=_batched(shape, bool, self.mesh),
            advantages=_batched((rows,), jnp.float32, self.mesh),
            row_mask=_batched((rows,), bool, self.mesh),
        )
        options = reinforce.LossOptions(mode=mode, remat=memory.remat)
        params = _z(self.factors, self.mesh, None)
        weights = abstract_weights(self.config, self.mesh, self.dtype, skip=self.targets)
        return reinforce.compute_gradients.lower(
            self.config, options, params, weights, self.factors, batch, count
        )


PROGRAMS = ("prefill", "decode", "factored_decode", "merge", "rl_merged", "rl_factored")


def _rl_search(
    programs: Programs, mode: str, memory: RLMemory, hbm: float, explicit: bool
) -> list[ProgramMemory]:
    """Compiles the RL step at `memory`; when it does not fit (and was not set explicitly),
    halves the microbatch down to the data-parallel size, then turns remat on."""
    data_parallel = parallel.data_parallel_size(programs.mesh)
    tried = []
    while True:
        settings = dataclasses.asdict(memory)
        result, _ = _measure(
            f"rl_{mode}", lambda m=memory: programs.rl_step(mode, m), hbm, settings
        )
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
    workload: Workload = Workload(),
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
        result, compiled_prefill = _measure("prefill", compiler.prefill, usable)
        if "prefill" in programs:
            record(result)
        compiler.decode_state(compiled_prefill)
    for name in ("decode", "factored_decode", "merge"):
        if name in programs:
            record(_measure(name, getattr(compiler, name), usable)[0])
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

"""t2jax's jitted programs lowered with abstract arguments, and the per-device memory of one
compiled for a topology.

The very functions that `t2jax train/adapt/eval/generate` run (`prefill.prefill`,
`sampler.decode`, `svf_factors.merge_kernels`, `rl.loss.compute_gradients`) are lowered with
`jax.ShapeDtypeStruct`s (`t2jax.plan.abstract`) and compiled: the TPU compiler rejects a program
that exceeds HBM (RESOURCE_EXHAUSTED), and `memory_analysis()` gives the per-device bytes of the
arguments, outputs and temporaries of one that fits.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from t2jax import model as model_lib
from t2jax import padding, parallel, prefill, sampler
from t2jax.config import ModelConfig
from t2jax.plan.abstract import (
    abstract_array,
    abstract_batched,
    abstract_factors,
    abstract_replicated,
    abstract_weights,
    abstract_z,
)
from t2jax.plan.hardware import GIB
from t2jax.plan.rules import RLMemory
from t2jax.rl import batch as rl_batch
from t2jax.rl import loss as rl_loss
from t2jax.svf import core as svf_lib
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets

PROGRAMS = ("prefill", "decode", "factored_decode", "merge", "rl_merged", "rl_factored")


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


def _exhausted(program: str, error: Exception, began: float, settings: dict[str, Any]):
    """The `ProgramMemory` of a compile the TPU compiler refused for lack of HBM, with the
    memory it reports needing where it says ("Used 20.2G of 15.75G hbm", or "... required for
    HLO temporaries (22.69G) exceeds ...")."""
    text = str(error)
    scale = {"G": 1, "M": 1 / 1024, "K": 1 / 1024**2}

    def gib(pattern: str) -> float | None:
        found = re.search(pattern, text)
        return round(float(found.group(1)) * scale[found.group(2)], 3) if found else None

    first_line = text.strip().splitlines()[0][:300]
    return ProgramMemory(
        program,
        False,
        temporaries_gib=gib(r"HLO temporaries \(([0-9.]+)([GMK])\)"),
        total_gib=gib(r"Used ([0-9.]+)([GMK])"),
        compile_seconds=round(time.perf_counter() - began, 1),
        error=first_line,
        settings=settings,
    )


def measure(
    program: str,
    lower: Callable[[], Any],
    hbm_gib: float,
    settings: dict[str, Any] | None = None,
) -> tuple[ProgramMemory, Any]:
    """Lowers and compiles one program; the TPU compiler raises RESOURCE_EXHAUSTED over HBM.

    Returns:
        Its memory record (fits when its total is at most `hbm_gib`) and the compiled program
        (None when it did not compile).
    """
    began = time.perf_counter()
    settings = settings or {}
    try:
        compiled = lower().compile()
    except Exception as error:  # XlaRuntimeError
        text = str(error)
        if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
            raise
        return _exhausted(program, error, began, settings), None
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
        self.targets = svf_targets.resolve_targets(workload.targets)
        self.rows = -(-workload.batch // parallel.data_parallel_size(mesh))
        self.rows *= parallel.data_parallel_size(mesh)
        self.weights = abstract_weights(config, mesh, self.dtype)
        self.factors = abstract_factors(config, mesh, self.dtype, self.targets)
        key = jax.eval_shape(lambda: jax.random.key(0))
        self.key = abstract_replicated(key.shape, key.dtype, mesh)
        self.scalar = abstract_replicated((), jnp.float32, mesh)
        self.eos = abstract_replicated((2,), jnp.int32, mesh)
        self._state = None

    def _cache(self) -> model_lib.KVCache:
        length = self.workload.prompt_length + padding.new_tokens_bucket(
            self.workload.max_new_tokens
        )
        shapes = jax.eval_shape(
            lambda: model_lib.init_cache(self.config, self.rows, length, dtype=self.dtype)
        )
        shardings = prefill.cache_shardings(shapes, self.mesh)
        return jax.tree.map(lambda s, sh: abstract_array(s.shape, s.dtype, sh), shapes, shardings)

    def prefill(self):
        """`prefill.prefill` of a batch of prompt buckets into an empty cache."""
        shape = (self.rows, self.workload.prompt_length)
        return prefill.prefill.lower(
            self.config,
            self.weights,
            None,
            abstract_batched(shape, jnp.int32, self.mesh),
            abstract_batched(shape, bool, self.mesh),
            self._cache(),
            self.key,
            self.scalar,
            self.scalar,
            self.eos,
        )

    @property
    def has_decode_state(self) -> bool:
        """Whether `decode_state` has been built (from a compiled prefill's shardings)."""
        return self._state is not None

    def decode_state(self, compiled_prefill: Any = None) -> prefill.DecodeState:
        """The abstract decode state the prefill returns (with its output shardings)."""
        if self._state is None:
            shapes = self.prefill().out_info
            shardings = (
                compiled_prefill.output_shardings
                if compiled_prefill is not None
                else jax.tree.map(lambda _: parallel.replicated(self.mesh), shapes)
            )
            self._state = jax.tree.map(
                lambda s, sh: abstract_array(s.shape, s.dtype, sh), shapes, shardings
            )
        return self._state

    def decode(self, svf: svf_lib.ModelSVF | None = None):
        """`sampler.decode`: the while loop over new tokens (needs `decode_state` first)."""
        stop = abstract_replicated((), jnp.int32, self.mesh)
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
        """`sampler.decode` with one expert per row (factored SVF, as adaptation runs it)."""
        z = abstract_z(self.factors, self.mesh, self.rows)
        return self.decode(svf_factors.svf_from_factors(self.factors, z, "factored"))

    def merge(self):
        """`svf_factors.merge_kernels`: W'(z) of every target, as each rollout/evaluation does."""
        z = abstract_z(self.factors, self.mesh, None)
        svf = svf_factors.svf_from_factors(self.factors, z, "merged")
        return svf_factors.merge_kernels.lower(svf.layers, self.dtype)

    def rl_step(self, mode: str, memory: RLMemory):
        """`rl.loss.compute_gradients` on a batch of `rl_batch` rows (targets' dense kernels
        dropped, as training loads them)."""
        rows, count = rl_batch.microbatch_layout(
            self.workload.rl_batch,
            memory.microbatch_size,
            parallel.data_parallel_size(self.mesh),
        )
        shape = (rows, self.workload.rl_sequence)
        batch = rl_loss.PolicyBatch(
            tokens=abstract_batched(shape, jnp.int32, self.mesh),
            token_mask=abstract_batched(shape, bool, self.mesh),
            completion_mask=abstract_batched(shape, bool, self.mesh),
            advantages=abstract_batched((rows,), jnp.float32, self.mesh),
            row_mask=abstract_batched((rows,), bool, self.mesh),
        )
        options = rl_loss.LossOptions(mode=mode, remat=memory.remat)
        params = abstract_z(self.factors, self.mesh, None)
        weights = abstract_weights(self.config, self.mesh, self.dtype, skip=self.targets)
        return rl_loss.compute_gradients.lower(
            self.config, options, params, weights, self.factors, batch, count
        )

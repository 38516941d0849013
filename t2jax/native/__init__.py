"""Native CPU kernels, compiled on first use with the host's C++ compiler and called through
`jax.ffi`.

- `rowdot` multiplies rows by bf16 matrices, one or several side by side in one call
  (`rowdot.cc`): at batch 1-4 XLA:CPU's bf16 dot streams the weights at a fraction of the memory
  bandwidth (docs/performance.md). `ops.dot_fp32` and `ops.matmul_group` take it for bf16
  kernels times at most `ROWDOT_MAX_ROWS` rows.
- `decode_attention` is one decode step of grouped-query attention over a bf16 KV cache, with
  the new keys and values written into the cache in place (`attention.cc`): XLA:CPU reads every
  slot of the cache, written or not, and copies each layer's cache for the write.
  `t2jax.attention.attend` takes it for decode steps on the CPU.

Both share helper threads on XLA's intra-op pool (`crew.h`). The library is built once per
source, compiler, flags, jax version and host into the t2jax cache (`-O3 -march=native`, written
atomically) and registered for the CPU platform only; every other platform lowers to XLA.
Without a compiler, on a build error, or with `T2JAX_NATIVE=0`, everything stays on XLA (a
build error is logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess

import jax
import jax.numpy as jnp

from t2jax import files

Array = jax.Array
SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in ("rowdot.cc", "attention.cc"))
HEADERS = tuple(pathlib.Path(__file__).with_name(name) for name in ("bf16.h", "crew.h"))
TARGET = "t2jax_rowdot_bf16"
ATTENTION_TARGET = "t2jax_decode_attention_bf16"
ENABLE_ENV = "T2JAX_NATIVE"
# Rows up to which the kernel replaces XLA's dot: decoding at batch 2 and 4 gains 1.3-2x with it
# (SmolLM2, Qwen-0.5B); at batch 8 SmolLM2 loses (179 vs 194 tok/s); docs/performance.md.
ROWDOT_MAX_ROWS = 4
FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp-simd",
    "-std=c++17",
    "-shared",
    "-fPIC",
)

log = logging.getLogger(__name__)


def compile_command(compiler: str, output: pathlib.Path) -> list[str]:
    """The compiler invocation that builds the kernels' library into `output`."""
    sources = [str(source) for source in SOURCES]
    return [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *sources, "-o", str(output)]


def library_path(compiler: str) -> pathlib.Path:
    """The cached library of this source, compiler, flags, jaxlib and machine."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = "\n".join([*texts, version, *FLAGS, jax.__version__, platform.machine(), platform.node()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return files.cache_dir() / "native" / f"kernels-{digest}.so"


def build(compiler: str) -> pathlib.Path:
    """Compiles the kernel library unless it is cached; returns its path."""
    path = library_path(compiler)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("compiling %s -> %s", ", ".join(source.name for source in SOURCES), path)
        files.write_atomically(
            path,
            lambda temporary: subprocess.run(
                compile_command(compiler, temporary), capture_output=True, text=True, check=True
            ),
        )
    return path


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered (once per process; False when disabled by
    `T2JAX_NATIVE=0`, without a C++ compiler, or when the build fails, which is logged)."""
    if os.environ.get(ENABLE_ENV, "1") == "0":
        return False
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("native kernels unavailable, using XLA: %s", detail)
        return False
    for target, handler in (
        (TARGET, library.T2jaxRowDotBf16),
        (ATTENTION_TARGET, library.T2jaxDecodeAttentionBf16),
    ):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return True


def wants_rowdot(x: Array, *kernels: Array) -> bool:
    """Whether a product of x [..., in] and kernels should use `rowdot`: non-empty 2-D bf16
    kernels, at most ROWDOT_MAX_ROWS rows, and the kernel available."""
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    return (
        all(k.dtype == jnp.bfloat16 and k.ndim == 2 and k.size > 0 for k in kernels)
        and 0 < rows <= ROWDOT_MAX_ROWS
        and available()
    )


def _rowdot_call(x: Array, *kernels: Array, transposed: bool) -> Array:
    """The kernel on the CPU (`rowdot`); XLA's dot where it is not available."""
    if not available():
        return xla_dot(x, kernels, transposed)
    rows = x.reshape(-1, x.shape[-1])  # [M, in]
    width = sum(kernel.shape[0] if transposed else kernel.shape[1] for kernel in kernels)
    result = jax.ShapeDtypeStruct((rows.shape[0], width), jnp.float32)
    call = jax.ffi.ffi_call(TARGET, result, vmap_method="sequential")  # vmapped: one call each
    out = call(rows, *kernels, transposed=transposed)  # [M, out]
    return out.reshape(*x.shape[:-1], width)  # [..., out]


def xla_dot(x: Array, kernels: Array | tuple[Array, ...], transposed: bool = False) -> Array:
    """x [..., in] @ [k_1 | k_2 | ...] for kernels [in, out_i] ([out_i, in] when `transposed`)
    by XLA's dots with fp32 accumulation, on every platform: what the kernel computes."""
    spec = "...i,oi->...o" if transposed else "...i,io->...o"
    kernels = kernels if isinstance(kernels, tuple) else (kernels,)
    outs = [jnp.einsum(spec, x, k, preferred_element_type=jnp.float32) for k in kernels]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, -1)  # [..., sum(out_i)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rowdot(x: Array, kernels: Array | tuple[Array, ...], transposed: bool = False) -> Array:
    """`xla_dot` (bf16 x and kernels, fp32 result; one kernel or a tuple side by side) by the
    native kernel where the program runs on the CPU, by XLA's dot elsewhere. Differentiable: its
    gradient is the dot's."""
    kernels = kernels if isinstance(kernels, tuple) else (kernels,)
    return jax.lax.platform_dependent(
        x,
        *kernels,
        cpu=functools.partial(_rowdot_call, transposed=transposed),
        default=lambda x, *kernels: xla_dot(x, kernels, transposed),
    )


def _rowdot_forward(x: Array, kernels, transposed: bool):
    return rowdot(x, kernels, transposed), (x, kernels)


def _rowdot_backward(transposed: bool, residuals, cotangent: Array):
    _, pullback = jax.vjp(functools.partial(xla_dot, transposed=transposed), *residuals)
    return pullback(cotangent)


rowdot.defvjp(_rowdot_forward, _rowdot_backward)


def wants_decode_attention(q: Array, k_cache: Array, v_cache: Array) -> bool:
    """Whether a step of queries q [B, 1, N, H] over caches [B, K, S, H] should use
    `decode_attention`: one new token per row, bf16 caches, and the kernel available."""
    return (
        q.ndim == 4
        and q.shape[1] == 1
        and k_cache.dtype == v_cache.dtype == jnp.bfloat16
        and available()
    )


def decode_attention(
    q: Array,
    k_new: Array,
    v_new: Array,
    k_cache: Array,
    v_cache: Array,
    visible: Array,
    new_visible: Array,
    slot: Array,
) -> tuple[Array, Array, Array]:
    """One decode step of grouped-query attention by the native CPU kernel (`attention.cc`).

    Args:
        q: [B, K, G, H] the step's queries, grouped by kv head.
        k_new, v_new: [B, K, 1, H] the step's keys and values.
        k_cache, v_cache: [B, K, S, H] bf16 caches; the outputs alias them (written in place
            unless XLA must keep the inputs, then it copies them first).
        visible: [B, S] the cache slots each row sees; new_visible: [B] whether it sees its own.
        slot: int scalar, where the step's keys and values go.

    Returns:
        out [B, K, G, H] fp32 (softmax over the visible slots and the new token, as
        `t2jax.attention.grouped_attention` computes it), and the caches with the slot written.

    Raises:
        RuntimeError: the kernels are not available (`available()`).
    """
    if not available():
        raise RuntimeError("the native kernels are not available; see the t2jax.native log")
    f32 = jnp.float32
    results = (
        jax.ShapeDtypeStruct(q.shape, f32),
        jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
        jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
    )
    call = jax.ffi.ffi_call(
        ATTENTION_TARGET, results, input_output_aliases={3: 1, 4: 2}, vmap_method="sequential"
    )
    return call(
        q.astype(f32),
        k_new.astype(f32),
        v_new.astype(f32),
        k_cache,
        v_cache,
        visible.astype(bool),
        new_visible.astype(bool),
        jnp.asarray(slot, jnp.int32),
    )

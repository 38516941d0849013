"""Native CPU kernels, compiled on first use with the host's C++ compiler and called through
`jax.ffi`.

`rowdot` multiplies rows by bf16 matrices, one or several side by side in one call
(`rowdot.cc`): at batch 1-4 XLA:CPU's bf16 dot streams the weights at a fraction of the memory
bandwidth (docs/performance.md). The library is built once per source, compiler, flags, jax
version and host into the t2jax cache (`-O3 -march=native`, written atomically) and registered
for the CPU platform only; `ops.dot_fp32` and `ops.matmul_group` take it for bf16 kernels times
at most `ROWDOT_MAX_ROWS` rows when it is available, and every other platform lowers to XLA's
dot. Without a compiler, on a build error, or with `T2JAX_NATIVE=0`, everything stays on XLA's
dot (a build error is logged once).
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
SOURCE = pathlib.Path(__file__).with_name("rowdot.cc")
TARGET = "t2jax_rowdot_bf16"
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
    """The compiler invocation that builds `rowdot.cc` into `output`."""
    return [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(output)]


def library_path(compiler: str) -> pathlib.Path:
    """The cached library of this source, compiler, flags, jaxlib and machine."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    key = "\n".join(
        [SOURCE.read_text(), version, *FLAGS, jax.__version__, platform.machine(), platform.node()]
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return files.cache_dir() / "native" / f"rowdot-{digest}.so"


def build(compiler: str) -> pathlib.Path:
    """Compiles the kernel library unless it is cached; returns its path."""
    path = library_path(compiler)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("compiling %s -> %s", SOURCE.name, path)
        files.write_atomically(
            path,
            lambda temporary: subprocess.run(
                compile_command(compiler, temporary), capture_output=True, text=True, check=True
            ),
        )
    return path


@functools.cache
def rowdot_available() -> bool:
    """Whether the kernel is built and registered (once per process; False when disabled by
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
        log.warning("native rowdot kernel unavailable, using XLA's dot: %s", detail)
        return False
    capsule = jax.ffi.pycapsule(library.T2jaxRowDotBf16)
    jax.ffi.register_ffi_target(TARGET, capsule, platform="cpu")
    return True


def wants_rowdot(x: Array, *kernels: Array) -> bool:
    """Whether a product of x [..., in] and kernels should use `rowdot`: non-empty 2-D bf16
    kernels, at most ROWDOT_MAX_ROWS rows, and the kernel available."""
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    return (
        all(k.dtype == jnp.bfloat16 and k.ndim == 2 and k.size > 0 for k in kernels)
        and 0 < rows <= ROWDOT_MAX_ROWS
        and rowdot_available()
    )


def _rowdot_call(x: Array, *kernels: Array, transposed: bool) -> Array:
    """The kernel on the CPU (`rowdot`); XLA's dot where it is not available."""
    if not rowdot_available():
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

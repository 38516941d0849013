"""Numerical building blocks shared by the decoder and SVF."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from t2jax import native

Array = jax.Array


def dot_fp32(x: Array, kernel: Array, transposed: bool = False) -> Array:
    """x [..., in] @ kernel [in, out] (kernel [out, in] when `transposed`) in the kernel's dtype
    with fp32 accumulation, returned in fp32. A few rows times a bf16 kernel (decoding at batch
    1-4, `native.ROWDOT_MAX_ROWS`) go to the native CPU kernel (`t2jax.native.rowdot`), which
    streams the weights faster than XLA:CPU's dot."""
    x_low = x.astype(kernel.dtype)  # [..., in]
    dot = native.rowdot if native.wants_rowdot(x_low, kernel) else native.xla_dot
    return dot(x_low, kernel, transposed)  # [..., out]


def matmul(x: Array, kernel: Array) -> Array:
    """x [..., in] @ kernel [in, out] in the kernel's dtype with fp32 accumulation (`dot_fp32`).

    The result comes back in x's dtype. With bf16 weights and fp32 activations (the CPU policy,
    see `t2jax.model.activation_dtype`) this keeps XLA:CPU's fast bf16 matmuls while everything
    around them stays fp32.
    """
    return dot_fp32(x, kernel).astype(x.dtype)  # [..., out]


def matmul_group(x: Array, kernels: Sequence[Array]) -> list[Array]:
    """`matmul` of x [..., in] by each of kernels [in, out_i] (q, k and v; gate and up). A few rows
    times bf16 kernels take one native call for all of them (`t2jax.native.rowdot`)."""
    x_low = x.astype(kernels[0].dtype)  # [..., in]
    if len(kernels) == 1 or not native.wants_rowdot(x_low, *kernels):
        return [matmul(x, kernel) for kernel in kernels]
    out = native.rowdot(x_low, tuple(kernels)).astype(x.dtype)  # [..., sum(out_i)]
    ends = list(itertools.accumulate(kernel.shape[1] for kernel in kernels))
    return jnp.split(out, ends[:-1], axis=-1)  # [..., out_i] each

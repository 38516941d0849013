"""Numerical building blocks shared by the decoder and SVF."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def matmul(x: Array, kernel: Array) -> Array:
    """x [..., in] @ kernel [in, out] in the kernel's dtype with fp32 accumulation.

    The result comes back in x's dtype. With bf16 weights and fp32 activations (the CPU policy,
    see `t2jax.model.activation_dtype`) this keeps XLA:CPU's fast bf16 matmuls while everything
    around them stays fp32.
    """
    out = jnp.einsum(
        "...i,io->...o", x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32
    )  # [..., out]
    return out.astype(x.dtype)

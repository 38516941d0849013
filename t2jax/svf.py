"""Singular Value Fine-tuning (SVF): expert vectors z that rescale frozen singular values.

Transformer² (arXiv 2501.06252) section 3.1; the official code's nuclear-norm-preserving rescale
(spec section 1.3):  W'(z) = A diag(s * z) B * (sum s / sum s * z), where W = A diag(s) B is the
reduced SVD of a kernel in `x @ W` orientation (A = V, B = U^T of HF's [out, in] weight U S V^T).

Two equivalent ways to apply it:
  * merged:   materialize W' (one z for the whole batch); decoding then costs as much as the base.
  * factored: ((x @ A) * (c s z)) @ B with z of shape [B, R]: every row carries its own expert.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Mode = Literal["merged", "factored"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SVFTarget:
    """Frozen SVD factors of one kernel and the expert vector that rescales them.

    Shapes are given for one layer; stacked trees add a leading L axis to every leaf.
    """

    a: Array  # [in, R]
    s: Array  # [R] fp32, descending
    b: Array  # [R, out]
    z: Array  # [R] (one expert) or [B, R] (one expert per row; factored mode only)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerSVF:
    """SVF targets of one layer (or of all layers, stacked), keyed by HF module name."""

    targets: dict[str, SVFTarget]
    mode: Mode = dataclasses.field(default="merged", metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelSVF:
    """SVF for the whole decoder: stacked `LayerSVF` ([L, ...] leaves) or a tuple of them."""

    layers: LayerSVF | tuple[LayerSVF, ...]


def nuclear_rescale(s: Array, z: Array) -> Array:
    """The factor sum(s) / sum(s * z) that keeps W' at W's nuclear norm. s: [R]; z: [..., R]."""
    s32, z32 = s.astype(jnp.float32), z.astype(jnp.float32)
    return jnp.sum(s32) / jnp.sum(s32 * z32, axis=-1)  # [...]


def compose(target: SVFTarget) -> Array:
    """Materializes W' = A diag(c s z) B in fp32 for a single expert z [R]; returns [in, out]."""
    if target.z.ndim != 1:
        raise ValueError(f"merged SVF needs one expert z of shape [R], got {target.z.shape}")
    scaled = target.s.astype(jnp.float32) * target.z.astype(jnp.float32)  # [R]
    scaled = scaled * nuclear_rescale(target.s, target.z)  # [R]
    a32 = target.a.astype(jnp.float32)  # [in, R]
    return (a32 * scaled) @ target.b.astype(jnp.float32)  # [in, out]


def adapted_matmul(x: Array, target: SVFTarget, mode: Mode) -> Array:
    """x @ W'(z). x: [B, T, in]; returns [B, T, out] in x's dtype."""
    if mode == "merged":
        kernel = compose(target).astype(x.dtype)  # [in, out]
        return jnp.einsum("bti,io->bto", x, kernel)  # [B, T, out]
    if mode != "factored":
        raise ValueError(f"unknown SVF mode {mode!r}; expected 'merged' or 'factored'")
    gains = target.s.astype(jnp.float32) * target.z.astype(jnp.float32)  # [R] or [B, R]
    gains = gains * nuclear_rescale(target.s, target.z)[..., None]  # [R] or [B, R]
    gains = jnp.broadcast_to(gains, (x.shape[0], gains.shape[-1]))  # [B, R]
    low = jnp.einsum("bti,ir->btr", x, target.a.astype(x.dtype))  # [B, T, R]
    low = low * gains[:, None, :].astype(x.dtype)  # [B, T, R]
    return jnp.einsum("btr,ro->bto", low, target.b.astype(x.dtype))  # [B, T, out]

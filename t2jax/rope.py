"""Rotary position embedding (RoPE) as HF computes it: the rotate-half layout (no q/k
permutation, so SVD factors line up with HF weights) and Llama-3 frequency-dependent scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from t2jax.config import RopeScaling

Array = jax.Array


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Array:
    """RoPE inverse frequencies [H/2] in fp32, with Llama-3 frequency-dependent scaling."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim  # [H/2]
    inv_freq = 1.0 / (theta**exponents)  # [H/2]
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [H/2]
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)  # [H/2]
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )  # [H/2]
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled  # [H/2]
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)  # [H/2]
    return jnp.where(is_medium, smoothed, scaled)


def rotation(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
    """cos and sin [B, T, 1, H] of the rotary angles at `positions` [B, T], for every layer's
    queries and keys (XLA:CPU still fuses them into each layer's rotation)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    return jnp.cos(angles), jnp.sin(angles)


def apply(x: Array, rotation: tuple[Array, Array]) -> Array:
    """Rotary embedding in HF's rotate-half layout. x: [B, T, heads, H]; `rotation`'s
    (cos, sin)."""
    cos, sin = rotation  # [B, T, 1, H] each
    first, second = jnp.split(x, 2, axis=-1)  # 2 x [B, T, heads, H/2]
    rotated = jnp.concatenate([-second, first], axis=-1)  # [B, T, heads, H]
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)  # [B, T, heads, H]

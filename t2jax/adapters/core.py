"""The baselines the paper compares SVF with (spec section 2.5), as pytrees that
`t2jax.model.forward` applies to named kernels inside the same jitted pass as SVF.

Kernels are in t2jax's `x @ W` orientation ([in, out]); PEFT's weights are [out, in]. Every
adapter leaf may carry a leading batch axis (one adapter per row, like SVF's factored mode):

  * LoRA (Hu et al.; PEFT `LoraConfig`):  x @ W + (alpha / r) (x @ A) @ B,
    A [in, r] (PEFT's lora_A.weight transposed), B [r, out] (lora_B.weight transposed).
  * IA3 (Liu et al.; PEFT `IA3Config`): a learned vector scales the output of k_proj / v_proj,
    (x @ W) * l, or the input of a feed-forward module (down_proj), (x * l) @ W.
  * DoRA (Liu et al.; PEFT `use_dora=True`): W' = m * (W + s A B) / ||W + s A B||, the norm of
    each output feature's column taken over the input axis (no gradient flows through it, as in
    PEFT), m [out] the learned magnitude.

Dropout (LoRA / DoRA training only, PEFT's `lora_dropout`) drops the input of the low-rank path
when a target carries a dropout key (`with_dropout`); inference never sets one.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from t2jax import ops

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoRATarget:
    """A low-rank update of one kernel (shapes for one layer, without a row axis)."""

    a: Array  # [in, r] or [B, in, r]
    b: Array  # [r, out] or [B, r, out]
    scale: float = dataclasses.field(metadata=dict(static=True))  # alpha / r
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    dropout_key: Array | None = None  # [2] uint32 key data (training only)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class IA3Target:
    """A learned rescaling of one kernel's output features, or of its input features."""

    vector: Array  # [out] or [in]; [B, ...] per row
    on_input: bool = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DoRATarget:
    """A LoRA direction with a learned magnitude per output feature."""

    a: Array  # [in, r] or [B, in, r]
    b: Array  # [r, out] or [B, r, out]
    magnitude: Array  # [out] or [B, out]
    scale: float = dataclasses.field(metadata=dict(static=True))  # alpha / r
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))
    dropout_key: Array | None = None  # [2] uint32 key data (training only)


Target = LoRATarget | IA3Target | DoRATarget
Kind = Literal["lora", "ia3", "dora"]
# Modules whose input IA3 scales (PEFT's `feedforward_modules` for Llama / Qwen2); the others'
# output.
IA3_INPUT_MODULES = ("mlp.down_proj",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerAdapters:
    """Adapters of one layer (or of all layers, stacked), keyed by HF module name."""

    targets: dict[str, Target]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelAdapters:
    """Adapters of the whole decoder: stacked `LayerAdapters` ([L, ...] leaves) or a tuple."""

    layers: LayerAdapters | tuple[LayerAdapters, ...]


def _low_rank(x: Array, a: Array, b: Array) -> Array:
    """(x @ A) @ B with A, B shared by the batch or one pair per row. x: [B, T, in]."""
    if a.ndim == 2:
        return ops.matmul(ops.matmul(x, a), b)  # [B, T, out]
    low = jnp.einsum("bti,bir->btr", x, a.astype(x.dtype))  # [B, T, r]
    return jnp.einsum("btr,bro->bto", low, b.astype(x.dtype))  # [B, T, out]


def _per_row(vector: Array) -> Array:
    """A vector [F] or per-row vectors [B, F] broadcast against [B, T, F]."""
    return vector if vector.ndim == 1 else vector[:, None, :]


def dora_norm_gain(kernel: Array, target: DoRATarget) -> Array:
    """m / ||W + s A B||: the gain of each output feature ([out], or [B, out] per row)."""
    combined = kernel.astype(jnp.float32) + target.scale * jnp.matmul(
        target.a.astype(jnp.float32), target.b.astype(jnp.float32)
    )  # [in, out] or [B, in, out]
    norm = jnp.sqrt(jnp.sum(jnp.square(combined), axis=-2))  # [out] or [B, out]
    # A constant in the backward pass, as in PEFT and the DoRA paper (section 4.3).
    return target.magnitude.astype(jnp.float32) / jax.lax.stop_gradient(norm)


def _dropped(x: Array, target: LoRATarget | DoRATarget) -> Array:
    """x with PEFT's inverted dropout applied when the target carries a dropout key."""
    if target.dropout_key is None or target.dropout == 0.0:
        return x
    keep = jax.random.bernoulli(
        jax.random.wrap_key_data(target.dropout_key), 1.0 - target.dropout, x.shape
    )  # [B, T, in]
    return jnp.where(keep, x / (1.0 - target.dropout), 0.0).astype(x.dtype)


def project(x: Array, kernel: Array, bias: Array | None, target: Target) -> Array:
    """x @ W' + bias for an adapted kernel W [in, out] (IA3 on an output scales the bias too, as
    PEFT does). x: [B, T, in]; returns [B, T, out].

    With dropout, as PEFT: LoRA adds s (drop(x) A) B to x W; DoRA adds (g - 1) drop(x) W +
    g s (drop(x) A) B, g = m / ||W + s A B|| (without dropout both equal (x W + s x A B) g)."""
    if isinstance(target, IA3Target):
        vector = _per_row(target.vector).astype(x.dtype)
        if target.on_input:
            out = ops.matmul(x * vector, kernel)  # [B, T, out]
            return out if bias is None else out + bias
        out = ops.matmul(x, kernel)  # [B, T, out]
        return (out if bias is None else out + bias) * vector
    dropped = _dropped(x, target)  # [B, T, in]
    out = ops.matmul(x, kernel)  # [B, T, out]
    low_rank = target.scale * _low_rank(dropped, target.a, target.b)  # [B, T, out]
    if isinstance(target, DoRATarget):
        gain = _per_row(dora_norm_gain(kernel, target)).astype(x.dtype)  # [out] or [B, 1, out]
        dropped_out = out if dropped is x else ops.matmul(dropped, kernel)  # [B, T, out]
        out = out + (gain - 1) * dropped_out + gain * low_rank  # [B, T, out]
    else:
        out = out + low_rank  # [B, T, out]
    return out if bias is None else out + bias


def merge(kernel: Array, bias: Array | None, target: Target) -> tuple[Array, Array | None]:
    """The adapted kernel W' [in, out] and bias [out] of one adapter shared by the batch."""
    w = kernel.astype(jnp.float32)  # [in, out]
    if isinstance(target, IA3Target):
        vector = target.vector.astype(jnp.float32)
        if target.on_input:
            return (w * vector[:, None]).astype(kernel.dtype), bias  # [in, out]
        scaled_bias = None if bias is None else (bias * vector).astype(bias.dtype)
        return (w * vector).astype(kernel.dtype), scaled_bias
    merged = w + target.scale * jnp.matmul(
        target.a.astype(jnp.float32), target.b.astype(jnp.float32)
    )  # [in, out]
    if isinstance(target, DoRATarget):
        merged = merged * dora_norm_gain(kernel, target)  # [in, out]
    return merged.astype(kernel.dtype), bias


def _lora_count(shape: tuple[int, int], rank: int) -> int:
    """Entries of A [in, r] and B [r, out]."""
    return rank * (shape[0] + shape[1])


def parameter_count(
    kind: str, shapes: dict[str, tuple[int, int]], num_layers: int, rank: int = 16
) -> int:
    """Trainable parameters of an adapter `kind` on kernels of `shapes` ([in, out] per module
    name) in each of `num_layers` layers."""
    per_layer = 0
    for name, shape in shapes.items():
        if kind == "lora":
            per_layer += _lora_count(shape, rank)
        elif kind == "dora":
            per_layer += _lora_count(shape, rank) + shape[1]
        elif kind == "ia3":
            per_layer += shape[0] if name in IA3_INPUT_MODULES else shape[1]
        else:
            raise ValueError(f"unknown adapter kind {kind!r}; expected lora, ia3 or dora")
    return per_layer * num_layers


def with_dropout(adapters: ModelAdapters, rate: float, key: Array) -> ModelAdapters:
    """`adapters` (stacked, [L, ...] leaves) with LoRA / DoRA dropout at `rate` and a fresh key
    per layer and module; IA3 targets unchanged (PEFT's IA3 has no dropout)."""
    if rate == 0.0:
        return adapters
    layers = adapters.layers
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    targets = {}
    for index, (name, target) in enumerate(sorted(layers.targets.items())):
        if isinstance(target, IA3Target):
            targets[name] = target
            continue
        keys = jax.random.split(jax.random.fold_in(key, index), num_layers)  # [L] keys
        targets[name] = dataclasses.replace(
            target, dropout=rate, dropout_key=jax.random.key_data(keys)
        )  # dropout_key: [L, 2] uint32
    return ModelAdapters(LayerAdapters(targets))

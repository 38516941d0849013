"""The baselines the paper compares SVF with (spec section 2.5), as pytrees that
`t2jax.model.forward` applies to named kernels inside the same jitted pass as SVF.

Kernels are in t2jax's `x @ W` orientation ([in, out]); PEFT's weights are [out, in]. Every
adapter leaf may carry a leading batch axis (one adapter per row, like SVF's factored mode):

  * LoRA (Hu et al.; PEFT `LoraConfig`):  x @ W + (alpha / r) (x @ A) @ B,
    A [in, r] (PEFT's lora_A.weight transposed), B [r, out] (lora_B.weight transposed).
  * IA3 (Liu et al.; PEFT `IA3Config`): a learned vector scales the output of k_proj / v_proj,
    (x @ W) * l, or the input of a feed-forward module (down_proj), (x * l) @ W.
  * DoRA (Liu et al.; PEFT `use_dora=True`): W' = m * (W + s A B) / ||W + s A B||, the norm of
    each output feature's column taken over the input axis, m [out] the learned magnitude.

Dropout (LoRA / DoRA training only) is not part of the forward here; inference never uses it.
"""

from __future__ import annotations

import dataclasses

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


Target = LoRATarget | IA3Target | DoRATarget
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
    return target.magnitude.astype(jnp.float32) / norm


def project(x: Array, kernel: Array, bias: Array | None, target: Target) -> Array:
    """x @ W' + bias for an adapted kernel W [in, out] (IA3 on an output scales the bias too, as
    PEFT does). x: [B, T, in]; returns [B, T, out]."""
    if isinstance(target, IA3Target):
        vector = _per_row(target.vector).astype(x.dtype)
        if target.on_input:
            out = ops.matmul(x * vector, kernel)  # [B, T, out]
            return out if bias is None else out + bias
        out = ops.matmul(x, kernel)  # [B, T, out]
        return (out if bias is None else out + bias) * vector
    out = ops.matmul(x, kernel) + target.scale * _low_rank(x, target.a, target.b)  # [B, T, out]
    if isinstance(target, DoRATarget):
        out = out * _per_row(dora_norm_gain(kernel, target)).astype(x.dtype)  # [B, T, out]
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

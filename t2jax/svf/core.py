"""Singular Value Fine-tuning (SVF): expert vectors z that rescale frozen singular values.

Transformer² (arXiv 2501.06252) section 3.1; the official code's nuclear-norm-preserving rescale
(spec section 1.3):  W'(z) = A diag(s * z) B * (sum s / sum s * z), where W = A diag(s) B is the
reduced SVD of a kernel in `x @ W` orientation (A = V, B = U^T of HF's [out, in] weight U S V^T).

Two equivalent ways to apply it:
  * merged:   materialize W' (one z for the whole batch); decoding then costs as much as the base.
  * factored: ((x @ A) * (c s z)) @ B with z of shape [B, R]: every row carries its own expert.
and "auto", for the teacher-forced gradient pass of training: per matrix, whichever of the two
costs fewer flops for a forward and backward pass over the batch's tokens (`gradient_pass_mode`).

This module is pure JAX on pytrees and knows nothing about checkpoints: the composition core above,
the parametrization z = sigmoid(p) * max_mult with the official initialization (spec section 1.2),
and expert mixing z' = sum_k alpha_k z_k (spec section 4.4). SVF parameters are dicts keyed by HF
module name ("mlp.gate_proj") with one [L, R] vector per layer; `t2jax.svf.factors` builds them from
SVD factors and `t2jax.svf.experts` stores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from t2jax import ops

Array = jax.Array
Mode = Literal["merged", "factored", "auto"]
SVFParams = dict[str, Array]  # module key -> [L, R] raw parameters (p, or z for "plain")
ZVectors = dict[str, Array]  # module key -> [L, R] (one expert) or [L, B, R] (one per row)

OFFICIAL_INIT_MEAN = 0.1  # p = 0.1 + 0.01 N(0, 1): `init_val` of the official config
OFFICIAL_INIT_STD = 0.01


class SVFError(ValueError):
    """SVF vectors, modes or mixing coefficients that do not fit together."""


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
        raise SVFError(f"merged SVF needs one expert z of shape [R], got {target.z.shape}")
    scaled = target.s.astype(jnp.float32) * target.z.astype(jnp.float32)  # [R]
    scaled = scaled * nuclear_rescale(target.s, target.z)  # [R]
    a32 = target.a.astype(jnp.float32)  # [in, R]
    return (a32 * scaled) @ target.b.astype(jnp.float32)  # [in, out]


def gradient_pass_mode(tokens: int, d_in: int, rank: int, d_out: int) -> Mode:
    """ "merged" or "factored", whichever needs fewer flops for a forward and backward pass (to z
    and x) of `tokens` tokens through one [d_in, d_out] kernel of SVD rank `rank`.

    Merged: x W', dx = dy W'^T and dW' = x^T dy (3 N in out), plus composing W' and its backward
    (3 in R out). Factored: (x A) B forward, dy B^T and its product with A^T backward (2 N R
    (in + out)); dz is an elementwise product of the two. So MLP kernels, with R = in < out / 2,
    are always cheaper factored; square attention kernels are cheaper merged once the tokens
    outnumber about 3 R.
    """
    merged = 3 * tokens * d_in * d_out + 3 * d_in * rank * d_out
    factored = 2 * tokens * rank * (d_in + d_out)
    return "factored" if factored < merged else "merged"


def adapted_matmul(x: Array, target: SVFTarget, mode: Mode) -> Array:
    """x @ W'(z). x: [B, T, in]; returns [B, T, out] in x's dtype."""
    if mode == "auto":
        (d_in, rank), d_out = target.a.shape, target.b.shape[-1]
        per_row = target.z.ndim == 2
        mode = (
            "factored"
            if per_row
            else gradient_pass_mode(x.shape[0] * x.shape[1], d_in, rank, d_out)
        )
    if mode == "merged":
        return ops.matmul(x, compose(target).astype(target.a.dtype))  # [B, T, out]
    if mode != "factored":
        raise SVFError(f"unknown SVF mode {mode!r}; expected 'merged', 'factored' or 'auto'")
    gains = target.s.astype(jnp.float32) * target.z.astype(jnp.float32)  # [R] or [B, R]
    gains = gains * nuclear_rescale(target.s, target.z)[..., None]  # [R] or [B, R]
    gains = jnp.broadcast_to(gains, (x.shape[0], gains.shape[-1]))  # [B, R]
    low = ops.matmul(x, target.a)  # [B, T, R]
    low = low * gains[:, None, :].astype(x.dtype)  # [B, T, R]
    return ops.matmul(low, target.b)  # [B, T, out]


# ----------------------------------------------------------------------------------------------
# Parametrization and initialization (spec section 1.2).


@dataclasses.dataclass(frozen=True)
class Parametrization:
    """How trainable parameters map to scales z.

    Attributes:
        kind: "sigmoid" (official: z = sigmoid(p) * max_mult) or "plain" (z is trained directly).
        max_mult: the sigmoid's upper bound (official default 1).
    """

    kind: Literal["sigmoid", "plain"] = "sigmoid"
    max_mult: float = 1.0

    def __post_init__(self):
        if self.kind not in ("sigmoid", "plain"):
            raise SVFError(f"unknown SVF parametrization {self.kind!r}; use 'sigmoid' or 'plain'")
        if not self.max_mult > 0:
            raise SVFError(f"max_mult must be positive, got {self.max_mult}")


OFFICIAL_PARAMETRIZATION = Parametrization("sigmoid", max_mult=1.0)


def init_params(
    key: Array,
    shapes: Mapping[str, tuple[int, ...]],
    parametrization: Parametrization = OFFICIAL_PARAMETRIZATION,
    *,
    std: float = OFFICIAL_INIT_STD,
) -> SVFParams:
    """Initial SVF parameters: p = 0.1 + std N(0, 1) (official), or z = 1 + std N(0, 1) (plain).

    Any uniform z reproduces the base weights (the rescale cancels it), so both starts are the base
    model up to the noise.

    Args:
        key: PRNG key.
        shapes: module key -> [L, R] (see `t2jax.svf.targets.svf_param_shapes`).
        parametrization: sigmoid (official) or plain.
        std: standard deviation of the noise.
    """
    mean = OFFICIAL_INIT_MEAN if parametrization.kind == "sigmoid" else 1.0
    keys = jax.random.split(key, len(shapes))
    return {
        name: mean + std * jax.random.normal(subkey, shape, jnp.float32)  # [L, R]
        for subkey, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
    }


def z_of(params: SVFParams, parametrization: Parametrization) -> ZVectors:
    """Scales z (fp32) from raw parameters: sigmoid(p) * max_mult, or the parameters themselves."""
    if parametrization.kind == "plain":
        return {name: p.astype(jnp.float32) for name, p in params.items()}
    return {
        name: jax.nn.sigmoid(p.astype(jnp.float32)) * parametrization.max_mult  # [L, R]
        for name, p in params.items()
    }


# ----------------------------------------------------------------------------------------------
# Several experts at once: per-row batches and mixtures (spec section 4.4).


def stack_experts(vectors: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
    """Stacks K experts' {key: [L, R]} into {key: [K, L, R]}."""
    _check_same_structure(vectors)
    return {name: jnp.stack([v[name] for v in vectors]) for name in vectors[0]}  # [K, L, R]


def per_row_experts(vectors: Sequence[Mapping[str, Array]]) -> ZVectors:
    """One expert per batch row: K experts' {key: [L, R]} -> {key: [L, K, R]} for factored SVF."""
    return {name: jnp.swapaxes(z, 0, 1) for name, z in stack_experts(vectors).items()}


def _map_expert_rows(svf: ModelSVF, fn: Callable[[Array], Array]) -> ModelSVF:
    """Applies `fn` to every per-row expert z ([..., B, R]); one-expert z ([R] or [L, R]) pass
    through unchanged."""

    def apply(target: SVFTarget) -> SVFTarget:
        if target.z.ndim != target.a.ndim:  # one expert: [R] or [L, R]
            return target
        return dataclasses.replace(target, z=fn(target.z))

    return jax.tree.map(apply, svf, is_leaf=lambda node: isinstance(node, SVFTarget))


def pad_expert_rows(svf: ModelSVF, rows: int) -> ModelSVF:
    """Pads per-row expert vectors ([B, R], or [L, B, R] stacked) to `rows` rows with z = 1, the
    base model (e.g. for a sampler that pads the batch); one-expert vectors pass through."""

    def pad(z: Array) -> Array:
        missing = rows - z.shape[-2]
        if missing < 0:
            raise SVFError(f"cannot pad {z.shape[-2]} expert rows to {rows}")
        widths = [(0, 0)] * z.ndim
        widths[-2] = (0, missing)
        return jnp.pad(z, widths, constant_values=1.0)  # [..., rows, R]

    return _map_expert_rows(svf, pad)


def take_expert_rows(svf: ModelSVF, rows: Array) -> ModelSVF:
    """Keeps the per-row expert vectors of batch rows `rows` [B'] (in that order); one-expert
    vectors pass through. Jit-able."""
    return _map_expert_rows(svf, lambda z: jnp.take(z, rows, axis=-2))  # [..., B', R]


def mix(
    vectors: Mapping[str, Array],
    alpha: Array,
    *,
    normalize: bool = False,
    order: Sequence[str] | None = None,
) -> dict[str, Array]:
    """Mixes K experts: v' = sum_k alpha_k v_k. Pure and jit-able (`order` must be static).

    Args:
        vectors: {key: [K, L, R]} (see `stack_experts`): the experts' z, or their raw p to mimic
            the official CEM code, which mixes pre-sigmoid parameters.
        alpha: [K] (one coefficient per expert) or [K, M] (one per expert and adapted matrix,
            M = L * len(order), matrices ordered layer-major as in the official code: layer 0's
            targets in `order`, then layer 1's, ...).
        normalize: divide alpha by its sum over experts (per matrix for [K, M]).
        order: the targets' matrix order within a layer; required for per-matrix alpha.

    Returns:
        {key: [L, R]} mixed vectors.

    Raises:
        SVFError: alpha's shape does not match the experts.
    """
    num_experts, num_layers = next(iter(vectors.values())).shape[:2]
    alpha = jnp.asarray(alpha, jnp.float32)
    if normalize:
        alpha = alpha / jnp.sum(alpha, axis=0, keepdims=True)  # [K] or [K, M]
    if alpha.ndim == 1:
        if alpha.shape != (num_experts,):
            raise SVFError(f"alpha has {alpha.shape[0]} entries for {num_experts} experts")
        per_key = {
            name: jnp.broadcast_to(alpha[:, None], (num_experts, num_layers)) for name in vectors
        }
    else:
        per_key = _per_matrix_alpha(alpha, vectors, num_experts, num_layers, order)
    return {
        name: jnp.einsum("kl,klr->lr", per_key[name], v.astype(jnp.float32))  # [L, R]
        for name, v in vectors.items()
    }


def _per_matrix_alpha(
    alpha: Array,
    vectors: Mapping[str, Array],
    num_experts: int,
    num_layers: int,
    order: Sequence[str] | None,
) -> dict[str, Array]:
    """Splits a [K, L * T] alpha (layer-major) into {key: [K, L]}."""
    if order is None or sorted(order) != sorted(vectors):
        raise SVFError(f"per-matrix alpha needs the matrix order of {sorted(vectors)}, got {order}")
    expected = (num_experts, num_layers * len(order))
    if alpha.shape != expected:
        raise SVFError(
            f"per-matrix alpha must have shape [K, matrices]={expected}, got {alpha.shape}"
        )
    by_layer = alpha.reshape(num_experts, num_layers, len(order))  # [K, L, T]
    return {name: by_layer[:, :, index] for index, name in enumerate(order)}  # [K, L]


def _check_same_structure(vectors: Sequence[Mapping[str, Array]]) -> None:
    if not vectors:
        raise SVFError("need at least one expert")
    for v in vectors[1:]:
        if set(v) != set(vectors[0]):
            raise SVFError(f"experts adapt different matrices: {sorted(v)} vs {sorted(vectors[0])}")
        for name in v:
            if v[name].shape != vectors[0][name].shape:
                raise SVFError(
                    f"experts disagree on {name}: {v[name].shape} vs {vectors[0][name].shape}"
                )

"""SVD factors of the SVF target kernels: the decomposition, where the factors live on devices,
and their use in the decoder (SVF pytrees, merged weights).

Spec section 1.1: a reduced SVD in fp32 of every adapted matrix, singular values descending. We
decompose our `x @ W` kernel W = W_hf^T, so with torch's W_hf = U diag(S) V^T we store A = V [in, R]
and B = U^T [R, out]: s is exactly torch's S, and component i of an expert scales the same singular
value as in the official release (spec section 6 relies on that order for cross-model transfer).
Signs of singular vectors are fixed (largest entry of each column of A positive) so results are
reproducible; W' does not depend on them.

Only targeted kernels are decomposed, one at a time, so an 8B model never needs its whole fp32 copy.
`t2jax.svf.cache` keeps the factors on disk; `t2jax.svf.targets` names and counts the targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from t2jax import model as model_lib
from t2jax import parallel
from t2jax.config import ModelConfig
from t2jax.svf import core as svf_lib
from t2jax.svf.targets import SVDError, hf_tensor_name, resolve_targets

Array = jax.Array
KernelSource = Callable[[int, str], Any]  # (layer, module key) -> kernel [in, out]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Factor:
    """Reduced SVD W = A diag(s) B of one kernel (stacked trees add a leading L axis)."""

    a: Array  # [in, R]
    s: Array  # [R] fp32, descending
    b: Array  # [R, out]

    def astype(self, dtype: Any) -> Factor:
        """A and B in `dtype`, s in fp32 (host arrays)."""
        return Factor(a=self.a.astype(dtype), s=self.s.astype(np.float32), b=self.b.astype(dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelFactors:
    """Factors of every target kernel, in the layer layout of `Weights.layers`: a dict of stacked
    `Factor`s ([L, ...] leaves) or a tuple of per-layer dicts. `fingerprint` names the model."""

    layers: dict[str, Factor] | tuple[dict[str, Factor], ...]
    fingerprint: str = dataclasses.field(metadata=dict(static=True))

    @property
    def targets(self) -> tuple[str, ...]:
        """Module keys with factors, in HF state-dict order."""
        return resolve_targets(tuple(self._first_layer()))

    @property
    def num_layers(self) -> int:
        if model_lib.is_stacked(self.layers):
            return next(iter(self.layers.values())).s.shape[0]
        return len(self.layers)

    def ranks(self) -> dict[str, int]:
        """Module key -> R."""
        return {key: f.s.shape[-1] for key, f in self._first_layer().items()}

    def select(self, targets: Sequence[str]) -> ModelFactors:
        """The factors of a subset of the targets.

        Raises:
            SVDError: a requested target was not decomposed.
        """
        missing = sorted(set(targets) - set(self.targets))
        if missing:
            raise SVDError(f"no factors for {missing}; decomposed targets: {list(self.targets)}")
        if model_lib.is_stacked(self.layers):
            layers = {key: self.layers[key] for key in targets}
        else:
            layers = tuple({key: layer[key] for key in targets} for layer in self.layers)
        return ModelFactors(layers=layers, fingerprint=self.fingerprint)

    def _first_layer(self) -> dict[str, Factor]:
        """Layer 0's factors, or the stacked ones (for keys and ranks only)."""
        return self.layers if model_lib.is_stacked(self.layers) else self.layers[0]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where factors live: their layer layout, the dtype of A and B, and the mesh they are
    computed on and sharded over.

    Attributes:
        stacked: layer layout; None: the backend's default (see `t2jax.model`).
        dtype: dtype of A and B (s stays fp32); the SVD itself always runs in fp32.
        mesh: compute on, and shard the factors over, this mesh; None: the default device.
    """

    stacked: bool | None = None
    dtype: Any = jnp.float32
    mesh: jax.sharding.Mesh | None = None

    @classmethod
    def for_weights(
        cls, weights: model_lib.Weights, mesh: jax.sharding.Mesh | None = None
    ) -> Placement:
        """Factors laid out and typed like `weights` (e.g. a `LoadedModel`'s, on its mesh)."""
        return cls(
            stacked=model_lib.is_stacked(weights.layers), dtype=weights.embed.dtype, mesh=mesh
        )


DEFAULT_PLACEMENT = Placement()  # the backend's layout, fp32, the default device


@jax.jit
def decompose_kernel(kernel: Array) -> Factor:
    """Reduced SVD in fp32 of a kernel [in, out], signs fixed so the result is reproducible."""
    u, s, vt = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)  # [in,R] [R] [R,out]
    largest = jnp.take_along_axis(u, jnp.argmax(jnp.abs(u), axis=0)[None], axis=0)[0]  # [R]
    signs = jnp.where(largest < 0, -1.0, 1.0)  # [R]
    return Factor(a=u * signs, s=s, b=vt * signs[:, None])


def kernels_from_tensors(tensors: Mapping[str, Any]) -> KernelSource:
    """Kernels read one at a time from HF-named tensors ([out, in]; e.g. `Checkpoint.tensors`)."""

    def kernel(layer: int, key: str) -> np.ndarray:
        return np.asarray(tensors[hf_tensor_name(layer, key)], np.float32).T  # [in, out]

    return kernel


def kernels_from_weights(weights: model_lib.Weights) -> KernelSource:
    """Kernels of loaded weights (placed, possibly sharded, device arrays)."""

    def kernel(layer: int, key: str) -> Array:
        if model_lib.is_stacked(weights.layers):
            return weights.layers[key][layer]  # [in, out]
        return weights.layers[layer][key]  # [in, out]

    return kernel


def factor_sharding(
    key: str, part: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh
) -> jax.sharding.NamedSharding:
    """Sharding of a factor leaf: A shares its kernel's input axis, B its output axis, and the rank
    axis takes the other kernel axis's mesh axes; s is replicated."""
    if part == "s":
        return parallel.replicated(mesh)
    return parallel.weight_sharding(key, shape, mesh)


def decompose(
    config: ModelConfig,
    kernel_of: KernelSource,
    targets: Sequence[str],
    *,
    fingerprint: str,
    placement: Placement = DEFAULT_PLACEMENT,
    progress: bool = True,
) -> ModelFactors:
    """Decomposes the target kernels in memory, one kernel at a time.

    Args:
        config: the model's architecture.
        kernel_of: where kernels come from (`kernels_from_tensors` or `kernels_from_weights`).
        targets: module keys (see `t2jax.svf.targets.resolve_targets`).
        fingerprint: the model's fingerprint (see `t2jax.svf.cache.fingerprint`), recorded in the
            result.
        placement: layout, dtype and mesh of the result (the SVD runs on its mesh).
        progress: show a progress bar.
    """
    computed = {
        (layer, key): factor.astype(placement.dtype)  # cast as they come: bf16 halves host memory
        for layer, key, factor in decompositions(
            config, kernel_of, targets, placement.mesh, progress
        )
    }
    return place_factors(config, targets, computed, fingerprint, placement)


def decompositions(
    config: ModelConfig,
    kernel_of: KernelSource,
    targets: Sequence[str],
    mesh: jax.sharding.Mesh | None,
    progress: bool,
    skip: Callable[[int, str], bool] = lambda layer, key: False,
) -> Iterator[tuple[int, str, Factor]]:
    """Yields (layer, key, fp32 host factor) for every target kernel not skipped, computing each
    SVD on `mesh` (None: the default device)."""
    items = [
        (layer, key)
        for layer in range(config.num_layers)
        for key in resolve_targets(targets)
        if not skip(layer, key)
    ]
    for layer, key in tqdm.tqdm(items, desc="SVD", unit="matrix", disable=not progress):
        kernel = kernel_of(layer, key)  # [in, out]
        if mesh is not None:
            kernel = jax.device_put(kernel, parallel.weight_sharding(key, kernel.shape, mesh))
        yield layer, key, jax.tree.map(parallel.host_array, decompose_kernel(kernel))


def place_factors(
    config: ModelConfig,
    targets: Sequence[str],
    factors: Mapping[tuple[int, str], Factor],
    fingerprint: str,
    placement: Placement,
) -> ModelFactors:
    """Per-kernel host factors {(layer, key): Factor} -> device `ModelFactors` in the placement's
    layout and on its mesh (dtypes are kept: cast with `Factor.astype` first)."""
    mesh = placement.mesh
    stacked = placement.stacked
    if stacked is None:
        stacked = model_lib.default_layout_is_stacked(mesh)
    targets = resolve_targets(targets)

    def place(key: str, factor: Factor) -> Factor:
        def put(part: str, array: np.ndarray) -> Array:
            if mesh is None:
                return jnp.asarray(array)
            return jax.device_put(array, factor_sharding(key, part, array.shape, mesh))

        return Factor(a=put("a", factor.a), s=put("s", factor.s), b=put("b", factor.b))

    def host_stack(key: str) -> Factor:
        per_layer = [factors[layer, key] for layer in range(config.num_layers)]
        return jax.tree.map(lambda *xs: np.stack(xs), *per_layer)  # [L, ...] leaves

    if stacked:
        layers = {key: place(key, host_stack(key)) for key in targets}
    else:
        layers = tuple(
            {key: place(key, factors[layer, key]) for key in targets}
            for layer in range(config.num_layers)
        )
    return ModelFactors(layers=layers, fingerprint=fingerprint)


# ----------------------------------------------------------------------------------------------
# Using factors in the decoder.


def svf_from_factors(
    factors: ModelFactors, z: svf_lib.ZVectors, mode: svf_lib.Mode = "merged"
) -> svf_lib.ModelSVF:
    """The `ModelSVF` that `model.forward` and the sampler take, in the factors' layer layout.

    Args:
        factors: SVD factors of the targets.
        z: module key -> [L, R] (one expert) or [L, B, R] (one expert per batch row; factored
            or auto mode), for exactly the factors' targets.
        mode: "merged" (compose W' per layer), "factored" (never materialize W') or "auto"
            (per matrix, the cheaper of the two for a gradient pass; `svf.core.gradient_pass_mode`).

    Raises:
        SVDError: z's targets or shapes do not match the factors.
    """
    _check_z(factors, z, mode)
    if model_lib.is_stacked(factors.layers):
        targets = {
            key: svf_lib.SVFTarget(f.a, f.s, f.b, z[key]) for key, f in factors.layers.items()
        }
        return svf_lib.ModelSVF(layers=svf_lib.LayerSVF(targets=targets, mode=mode))
    layers = tuple(
        svf_lib.LayerSVF(
            targets={key: svf_lib.SVFTarget(f.a, f.s, f.b, z[key][i]) for key, f in layer.items()},
            mode=mode,
        )
        for i, layer in enumerate(factors.layers)
    )
    return svf_lib.ModelSVF(layers=layers)


def _check_z(factors: ModelFactors, z: Mapping[str, Any], mode: svf_lib.Mode) -> None:
    if set(z) != set(factors.targets):
        raise SVDError(
            f"z adapts {sorted(z)} but the factors cover {sorted(factors.targets)}; use "
            "`ModelFactors.select` or an expert for the same targets"
        )
    ranks = factors.ranks()
    for key, vector in z.items():
        shape = np.shape(vector)
        per_row = len(shape) == 3
        if len(shape) not in (2, 3) or shape[0] != factors.num_layers or shape[-1] != ranks[key]:
            raise SVDError(
                f"z[{key!r}] has shape {shape}; expected [L, R] or [L, B, R] with L="
                f"{factors.num_layers}, R={ranks[key]}"
            )
        if per_row and mode == "merged":
            raise SVDError("one expert per row needs mode='factored' (merged W' is one matrix)")


def merge_into_weights(
    weights: model_lib.Weights, factors: ModelFactors, z: svf_lib.ZVectors
) -> model_lib.Weights:
    """Weights whose target kernels are W'(z), materialized once (fp32, cast to the weights'
    dtype), so decoding with them runs at exactly the base model's cost. Dropped dense kernels
    (see `drop_target_kernels`) come back as W'(z). Jit-able. Outside jit, W' is placed like the
    kernel it replaces; otherwise it inherits the factors' sharding (A shares the kernel's input
    axis, B its output axis)."""
    svf = svf_from_factors(factors, z, "merged")
    dtype = weights.embed.dtype
    if model_lib.is_stacked(weights.layers):
        merged = merge_kernels(_stacked_svf(svf.layers), dtype)
        return dataclasses.replace(weights, layers=_with_kernels(weights.layers, merged))
    layers = tuple(
        _with_kernels(layer, _merged_layer(model_lib.layer_slice(svf.layers, i), dtype))
        for i, layer in enumerate(weights.layers)
    )
    return dataclasses.replace(weights, layers=layers)


def _with_kernels(layer: dict[str, Array], kernels: dict[str, Array]) -> dict[str, Array]:
    """`layer` with `kernels` added or replacing entries, placed like the concrete arrays they
    replace (under jit those are tracers without a sharding: propagation decides)."""

    def placed(key: str, kernel: Array) -> Array:
        old = layer.get(key)
        if old is None or isinstance(old, jax.core.Tracer):
            return kernel
        return jax.device_put(kernel, old.sharding)

    return {**layer, **{key: placed(key, kernel) for key, kernel in kernels.items()}}


def drop_target_kernels(weights: model_lib.Weights, targets: Sequence[str]) -> model_lib.Weights:
    """Weights without the dense target kernels (the factors replace them: W == compose(z=1))."""

    def keep(layer: dict) -> dict:
        return {key: value for key, value in layer.items() if key not in targets}

    if model_lib.is_stacked(weights.layers):
        return dataclasses.replace(weights, layers=keep(weights.layers))
    return dataclasses.replace(weights, layers=tuple(keep(layer) for layer in weights.layers))


@jax.jit(static_argnames="dtype")
def _merged_layer(layer_svf: svf_lib.LayerSVF, dtype: Any) -> dict[str, Array]:
    return {key: svf_lib.compose(t).astype(dtype) for key, t in layer_svf.targets.items()}


@jax.jit(static_argnames="dtype")
def merge_kernels(layer_svf: svf_lib.LayerSVF, dtype: Any) -> dict[str, Array]:
    """W'(z) [L, in, out] in `dtype` of every stacked target, one layer at a time (`lax.map`) to
    bound fp32 memory: the program behind `merge_into_weights` for stacked layers."""
    return {
        key: jax.lax.map(lambda t: svf_lib.compose(t).astype(dtype), target)  # [L, in, out]
        for key, target in layer_svf.targets.items()
    }


def _stacked_svf(layers: svf_lib.LayerSVF | tuple[svf_lib.LayerSVF, ...]) -> svf_lib.LayerSVF:
    if isinstance(layers, tuple):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return layers

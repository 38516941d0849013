"""SVD factors of the SVF target kernels: decomposition, model fingerprints, on-disk cache, and
their use in the decoder (SVF pytrees, merged weights, trainable-parameter counts).

Spec section 1.1: a reduced SVD in fp32 of every adapted matrix, singular values descending. We
decompose our `x @ W` kernel W = W_hf^T, so with torch's W_hf = U diag(S) V^T we store A = V [in, R]
and B = U^T [R, out]: s is exactly torch's S, and component i of an expert scales the same singular
value as in the official release (spec section 6 relies on that order for cross-model transfer).
Signs of singular vectors are fixed (largest entry of each column of A positive) so results are
reproducible; W' does not depend on them. Section 1.4 lists the target sets, section 1.5 the
parameter counts.

Only targeted kernels are decomposed, one at a time, so an 8B model never needs its whole fp32 copy.
The cache holds one orbax item per kernel, named by its HF tensor name
("model.layers.3.mlp.gate_proj.weight"), next to a `meta.json` with the model fingerprint; loading
factors computed for another model raises `FingerprintError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import platformdirs
import tqdm

from t2jax import model as model_lib
from t2jax import parallel
from t2jax.config import ModelConfig
from t2jax.svf import core as svf_lib

Array = jax.Array
KernelSource = Callable[[int, str], Any]  # (layer, module key) -> kernel [in, out]

MODULE_ORDER = model_lib.ATTN_KERNELS + model_lib.MLP_KERNELS  # HF state-dict order in a layer
TARGET_SETS = {
    "mlp": model_lib.MLP_KERNELS,  # the official code's default (spec section 1.4)
    "qv": ("self_attn.q_proj", "self_attn.v_proj"),  # the paper's 0.16M "attention" ablation
    "attn": model_lib.ATTN_KERNELS,
    "all": MODULE_ORDER,
}
CACHE_FORMAT = "t2jax.svd_factors"
CACHE_VERSION = 1
FINGERPRINT_EMBED_ROWS = 64  # embedding rows sampled into a fingerprint
_TENSOR_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


class SVDError(ValueError):
    """Factors that do not match the model, the targets, or the request."""


class FingerprintError(SVDError):
    """Factors or an expert computed for a different model than the one given."""


# ----------------------------------------------------------------------------------------------
# Targets, names and shapes.


def resolve_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Module keys of target sets and module keys, given as a sequence or a comma-separated string
    ("mlp", "qv,mlp", "mlp.up_proj,self_attn.q_proj"), in HF state-dict order.

    Raises:
        SVDError: an unknown set or module key.
    """
    parts = [part.strip() for part in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [name for part in parts for name in TARGET_SETS.get(part, (part,))]
    unknown = sorted(set(names) - set(MODULE_ORDER))
    if unknown or not names:
        raise SVDError(
            f"unknown SVF targets {unknown or spec!r}; use one of {sorted(TARGET_SETS)} or "
            f"module keys from {list(MODULE_ORDER)}"
        )
    return tuple(key for key in MODULE_ORDER if key in names)


def hf_tensor_name(layer: int, key: str) -> str:
    """HF name of a layer's kernel: (3, "mlp.up_proj") -> "model.layers.3.mlp.up_proj.weight"."""
    return f"model.layers.{layer}.{key}.weight"


def parse_hf_tensor_name(name: str) -> tuple[int, str]:
    """Inverse of `hf_tensor_name`.

    Raises:
        SVDError: not the name of a per-layer linear kernel.
    """
    match = _TENSOR_NAME.fullmatch(name)
    if not match or match.group(2) not in MODULE_ORDER:
        raise SVDError(f"{name!r} is not the HF name of a decoder layer's linear weight")
    return int(match.group(1)), match.group(2)


def kernel_shape(config: ModelConfig, key: str) -> tuple[int, int]:
    """[in, out] shape of a per-layer kernel of `config`."""
    out_dim, in_dim = model_lib.expected_hf_shapes(config)[hf_tensor_name(0, key)]
    return in_dim, out_dim


def svf_param_shapes(config: ModelConfig, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Module key -> [L, R] with R = min(in, out), the reduced SVD's rank."""
    return {key: (config.num_layers, min(kernel_shape(config, key))) for key in targets}


def svf_param_count(config: ModelConfig, targets: Sequence[str]) -> int:
    """Exact number of trainable SVF parameters, from shapes only (`jax.eval_shape`, no weights).

    Llama-3-8B: 393,216 for the MLP targets and 163,840 for q/v (spec section 1.5).
    """
    shapes = svf_param_shapes(config, targets)
    abstract = jax.eval_shape(lambda: svf_lib.init_params(jax.random.key(0), shapes))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))


def lora_param_count(config: ModelConfig, targets: Sequence[str], rank: int) -> int:
    """Trainable parameters of LoRA with `rank` on the same kernels: rank * (in + out) each.

    Llama-3-8B, rank 16 on q/v: 6,815,744 (spec section 1.5).
    """
    per_layer = sum(rank * sum(kernel_shape(config, key)) for key in targets)
    return config.num_layers * per_layer


# ----------------------------------------------------------------------------------------------
# Factors.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Factor:
    """Reduced SVD W = A diag(s) B of one kernel (stacked trees add a leading L axis)."""

    a: Array  # [in, R]
    s: Array  # [R] fp32, descending
    b: Array  # [R, out]


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
    stacked: bool | None = None,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> ModelFactors:
    """Decomposes the target kernels in memory, one kernel at a time.

    Args:
        config: the model's architecture.
        kernel_of: where kernels come from (`kernels_from_tensors` or `kernels_from_weights`).
        targets: module keys (see `resolve_targets`).
        fingerprint: the model's fingerprint (see `fingerprint`), recorded in the result.
        stacked: layer layout of the result; defaults to the backend's (see `t2jax.model`).
        dtype: dtype of A and B (s stays fp32); the SVD itself always runs in fp32.
        mesh: compute on, and shard the factors over, this mesh.
        progress: show a progress bar.
    """
    computed = {
        (layer, key): _cast(factor, dtype)  # cast as they come: bf16 halves host memory
        for layer, key, factor in _decompositions(config, kernel_of, targets, mesh, progress)
    }
    return _assemble(config, targets, computed, fingerprint, stacked, mesh)


def _decompositions(
    config: ModelConfig,
    kernel_of: KernelSource,
    targets: Sequence[str],
    mesh: jax.sharding.Mesh | None,
    progress: bool,
    skip: Callable[[int, str], bool] = lambda layer, key: False,
) -> Iterator[tuple[int, str, Factor]]:
    """Yields (layer, key, fp32 host factor) for every target kernel not skipped."""
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


def _assemble(
    config: ModelConfig,
    targets: Sequence[str],
    factors: Mapping[tuple[int, str], Factor],
    fingerprint: str,
    stacked: bool | None,
    mesh: jax.sharding.Mesh | None,
) -> ModelFactors:
    """Per-kernel host factors -> device `ModelFactors` in the requested layout."""
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


def _cast(factor: Factor, dtype: Any) -> Factor:
    """A and B in `dtype`, s in fp32 (host arrays)."""
    return Factor(a=factor.a.astype(dtype), s=factor.s.astype(np.float32), b=factor.b.astype(dtype))


# ----------------------------------------------------------------------------------------------
# Fingerprints.


def fingerprint(config: ModelConfig, tensors: Mapping[str, Any]) -> str:
    """A short hash that identifies a model: its config, every norm weight and a strided sample of
    embedding rows, rounded to bf16 so the same model loaded in fp32 or bf16 gets the same hash.

    Args:
        config: the architecture.
        tensors: HF-named tensors (e.g. `Checkpoint.tensors`, or `weights_as_tensors(weights)`);
            only the embedding and norms are read.
    """
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    stride = max(1, config.vocab_size // FINGERPRINT_EMBED_ROWS)
    for name in _fingerprint_tensor_names(config):
        array = tensors[name]
        if name == "model.embed_tokens.weight":
            array = array[::stride]  # [V / stride, D]
        rounded = np.asarray(array).astype(np.float32).astype(ml_dtypes.bfloat16)
        digest.update(name.encode())
        digest.update(rounded.tobytes())
    return digest.hexdigest()[:16]


def weights_as_tensors(config: ModelConfig, weights: model_lib.Weights) -> dict[str, Array]:
    """The HF-named tensors of `weights` that `fingerprint` reads (no copies)."""
    tensors = {"model.embed_tokens.weight": weights.embed, "model.norm.weight": weights.final_norm}
    for layer in range(config.num_layers):
        for key in model_lib.LAYER_NORMS:
            if model_lib.is_stacked(weights.layers):
                norm = weights.layers[key][layer]  # [D]
            else:
                norm = weights.layers[layer][key]  # [D]
            tensors[f"model.layers.{layer}.{key}.weight"] = norm
    return tensors


def _fingerprint_tensor_names(config: ModelConfig) -> list[str]:
    per_layer = [
        f"model.layers.{layer}.{key}.weight"
        for layer in range(config.num_layers)
        for key in model_lib.LAYER_NORMS
    ]
    return ["model.embed_tokens.weight", "model.norm.weight", *per_layer]


def check_fingerprint(found: str | None, expected: str, what: str) -> None:
    """Raises `FingerprintError` unless `found` (None: unknown, accepted) equals `expected`."""
    if found is not None and found != expected:
        raise FingerprintError(
            f"{what} was computed for another model (fingerprint {found}, this model has "
            f"{expected})"
        )


# ----------------------------------------------------------------------------------------------
# On-disk cache (orbax, one item per kernel, keyed by HF tensor names).


def decompose_to_cache(
    config: ModelConfig,
    kernel_of: KernelSource,
    targets: Sequence[str],
    directory: str | pathlib.Path,
    *,
    fingerprint: str,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Decomposes the target kernels not yet in `directory` and writes them there in fp32 (an
    interrupted run resumes). Returns the directory.

    Raises:
        FingerprintError: the directory holds factors of another model.
    """
    directory = pathlib.Path(directory).expanduser().resolve()
    _check_or_write_meta(directory, config, fingerprint)

    def cached(layer: int, key: str) -> bool:
        return (directory / hf_tensor_name(layer, key)).is_dir()

    with ocp.StandardCheckpointer() as checkpointer:
        for layer, key, factor in _decompositions(
            config, kernel_of, targets, mesh, progress, skip=cached
        ):
            checkpointer.save(directory / hf_tensor_name(layer, key), dataclasses.asdict(factor))
        checkpointer.wait_until_finished()
    return directory


def load_factors(
    directory: str | pathlib.Path,
    config: ModelConfig,
    targets: Sequence[str],
    *,
    fingerprint: str,
    stacked: bool | None = None,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
) -> ModelFactors:
    """Loads cached factors (see `decompose_to_cache`); arguments as for `decompose`.

    Raises:
        FingerprintError: the factors were computed for another model.
        SVDError: no cache there, a target kernel is missing, or a factor has the wrong shape.
    """
    directory = pathlib.Path(directory).expanduser().resolve()
    meta = _read_meta(directory)
    if meta is None:
        raise SVDError(f"no SVD factors in {directory}; run `t2jax decompose` first")
    check_fingerprint(meta["fingerprint"], fingerprint, f"the SVD cache in {directory}")
    factors = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for layer in range(config.num_layers):
            for key in resolve_targets(targets):
                item = directory / hf_tensor_name(layer, key)
                if not item.is_dir():
                    raise SVDError(f"{item.name} is not in the SVD cache {directory}")
                factor = Factor(**checkpointer.restore(item))
                _check_factor_shapes(factor, kernel_shape(config, key), item.name)
                factors[layer, key] = _cast(factor, dtype)
    return _assemble(config, targets, factors, fingerprint, stacked, mesh)


def cached_factors(
    config: ModelConfig,
    kernel_of: KernelSource,
    targets: Sequence[str],
    directory: str | pathlib.Path,
    *,
    fingerprint: str,
    stacked: bool | None = None,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> ModelFactors:
    """Factors from the cache in `directory`, decomposing (and caching) whatever is missing."""
    decompose_to_cache(
        config,
        kernel_of,
        targets,
        directory,
        fingerprint=fingerprint,
        mesh=mesh,
        progress=progress,
    )
    return load_factors(
        directory,
        config,
        targets,
        fingerprint=fingerprint,
        stacked=stacked,
        dtype=dtype,
        mesh=mesh,
    )


def default_cache_root() -> pathlib.Path:
    """Where factors are cached unless told otherwise: the user cache dir's `svd` folder."""
    return pathlib.Path(platformdirs.user_cache_dir("t2jax")) / "svd"


def checkpoint_factors(
    checkpoint: Any,
    targets: Sequence[str],
    *,
    cache_root: str | pathlib.Path | None = None,
    stacked: bool | None = None,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> ModelFactors:
    """Factors of a `t2jax.checkpoints.Checkpoint`'s targets, read kernel by kernel from its lazy
    tensors and cached under `cache_root / fingerprint` (default `default_cache_root()`)."""
    model_fingerprint = fingerprint(checkpoint.config, checkpoint.tensors)
    root = default_cache_root() if cache_root is None else pathlib.Path(cache_root)
    return cached_factors(
        checkpoint.config,
        kernels_from_tensors(checkpoint.tensors),
        targets,
        root / model_fingerprint,
        fingerprint=model_fingerprint,
        stacked=stacked,
        dtype=dtype,
        mesh=mesh,
        progress=progress,
    )


def _check_factor_shapes(factor: Factor, shape: tuple[int, int], name: str) -> None:
    in_dim, out_dim = shape
    rank = min(shape)
    expected = {"a": (in_dim, rank), "s": (rank,), "b": (rank, out_dim)}
    found = {part: np.shape(getattr(factor, part)) for part in expected}
    if found != expected:
        raise SVDError(f"cached factors of {name} have shapes {found}, expected {expected}")


def _read_meta(directory: pathlib.Path) -> dict | None:
    path = directory / "meta.json"
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        raise SVDError(f"{path} is not a t2jax SVD cache of version {CACHE_VERSION}")
    return meta


def _check_or_write_meta(directory: pathlib.Path, config: ModelConfig, fingerprint: str) -> None:
    meta = _read_meta(directory)
    if meta is not None:
        check_fingerprint(meta["fingerprint"], fingerprint, f"the SVD cache in {directory}")
        return
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "config": dataclasses.asdict(config),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# Using factors in the decoder.


def svf_from_factors(
    factors: ModelFactors, z: svf_lib.ZVectors, mode: svf_lib.Mode = "merged"
) -> svf_lib.ModelSVF:
    """The `ModelSVF` that `model.forward` and the sampler take, in the factors' layer layout.

    Args:
        factors: SVD factors of the targets.
        z: module key -> [L, R] (one expert) or [L, B, R] (one expert per batch row; factored
            mode only), for exactly the factors' targets.
        mode: "merged" (compose W' per layer) or "factored" (never materialize W').

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

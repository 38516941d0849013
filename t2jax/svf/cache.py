"""Model fingerprints and the on-disk cache of SVD factors.

A fingerprint is a short hash that names a model; factors and experts record it, so applying them
to another model raises `FingerprintError`. The cache holds one orbax item per kernel, named by its
HF tensor name ("model.layers.3.mlp.gate_proj.weight"), next to a `meta.json` with the model's
fingerprint, under `cache root / fingerprint`. Decomposition resumes where an interrupted run
stopped; loading places the factors as asked (`t2jax.svf.factors.Placement`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from t2jax import model as model_lib
from t2jax.config import ModelConfig
from t2jax.files import cache_dir, write_text_atomically
from t2jax.loading import LoadedModel
from t2jax.svf import factors as svf_factors
from t2jax.svf.targets import SVDError, hf_tensor_name, kernel_shape, resolve_targets

Array = jax.Array

CACHE_FORMAT = "t2jax.svd_factors"
CACHE_VERSION = 1
FINGERPRINT_EMBED_ROWS = 64  # embedding rows sampled into a fingerprint


class FingerprintError(SVDError):
    """Factors or an expert computed for a different model than the one given."""


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


def default_cache_root() -> pathlib.Path:
    """Where factors are cached unless told otherwise: the t2jax cache's `svd` folder
    (`t2jax.files.cache_dir`, `$T2JAX_CACHE` overrides)."""
    return cache_dir() / "svd"


def loaded_model_factors(
    loaded: LoadedModel,
    targets: Sequence[str],
    *,
    cache_root: str | pathlib.Path | None = None,
    progress: bool = True,
) -> svf_factors.ModelFactors:
    """Factors of a loaded model's targets, placed like its weights on its mesh: read kernel by
    kernel from the checkpoint's lazy tensors (the weights may omit the target kernels) and cached
    under `cache_root / fingerprint` (default `default_cache_root()`)."""
    checkpoint = loaded.checkpoint
    model_fingerprint = fingerprint(checkpoint.config, checkpoint.tensors)
    root = default_cache_root() if cache_root is None else pathlib.Path(cache_root)
    return cached_factors(
        checkpoint.config,
        svf_factors.kernels_from_tensors(checkpoint.tensors),
        targets,
        root / model_fingerprint,
        fingerprint=model_fingerprint,
        placement=svf_factors.Placement.for_weights(loaded.weights, loaded.mesh),
        progress=progress,
    )


def cached_factors(
    config: ModelConfig,
    kernel_of: svf_factors.KernelSource,
    targets: Sequence[str],
    directory: str | pathlib.Path,
    *,
    fingerprint: str,
    placement: svf_factors.Placement = svf_factors.DEFAULT_PLACEMENT,
    progress: bool = True,
) -> svf_factors.ModelFactors:
    """Factors from the cache in `directory`, decomposing (and caching) whatever is missing;
    arguments as for `t2jax.svf.factors.decompose`."""
    decompose_to_cache(
        config,
        kernel_of,
        targets,
        directory,
        fingerprint=fingerprint,
        mesh=placement.mesh,
        progress=progress,
    )
    return load_factors(directory, config, targets, fingerprint=fingerprint, placement=placement)


def decompose_to_cache(
    config: ModelConfig,
    kernel_of: svf_factors.KernelSource,
    targets: Sequence[str],
    directory: str | pathlib.Path,
    *,
    fingerprint: str,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Decomposes (on `mesh`) the target kernels not yet in `directory` and writes them there in
    fp32 (an interrupted run resumes). Returns the directory.

    Raises:
        FingerprintError: the directory holds factors of another model.
    """
    directory = pathlib.Path(directory).expanduser().resolve()
    _check_or_write_meta(directory, config, fingerprint)

    def cached(layer: int, key: str) -> bool:
        return (directory / hf_tensor_name(layer, key)).is_dir()

    with ocp.StandardCheckpointer() as checkpointer:
        for layer, key, factor in svf_factors.decompositions(
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
    placement: svf_factors.Placement = svf_factors.DEFAULT_PLACEMENT,
) -> svf_factors.ModelFactors:
    """Loads cached factors (see `decompose_to_cache`); arguments as for
    `t2jax.svf.factors.decompose`.

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
                factor = svf_factors.Factor(**checkpointer.restore(item))
                _check_factor_shapes(factor, kernel_shape(config, key), item.name)
                factors[layer, key] = factor.astype(placement.dtype)
    return svf_factors.place_factors(config, targets, factors, fingerprint, placement)


def _check_factor_shapes(factor: svf_factors.Factor, shape: tuple[int, int], name: str) -> None:
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
    write_text_atomically(directory / "meta.json", json.dumps(meta, indent=1, sort_keys=True))

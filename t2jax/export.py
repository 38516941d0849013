"""Export: a model with an SVF expert merged into its weights, W' = U diag(s z) V^T, written as a
standard Hugging Face checkpoint that transformers' `AutoModelForCausalLM.from_pretrained` (and
`t2jax.load_model`) loads.

    loaded = load_model("smollm2-135m-instruct", dtype=jnp.float32)
    expert = load_expert("math.safetensors")
    export_expert(loaded, expert, "smollm2-math", dtype="bfloat16")

The directory holds `config.json` (the checkpoint's HF config; for a GGUF file the one synthesized
from its metadata), `model.safetensors` (one file, HF names, `[out, in]` kernels, no `lm_head`
when the embedding is tied), `generation_config.json` (every end id), and the tokenizer files with
the chat template. It is written into a temporary sibling directory and renamed into place at the
end, so `out_dir` is either absent, as it was, or complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from t2jax import files
from t2jax import model as model_lib
from t2jax.checkpoints.common import Checkpoint, hf_layer_tensor_names
from t2jax.checkpoints.hf import model_config_from_hf
from t2jax.config import ModelConfig
from t2jax.loading import LoadedModel
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib
from t2jax.svf import factors as svf_factors

WEIGHTS_FILE = "model.safetensors"
SAVED_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# HF config keys that describe the source file rather than the exported one.
_DROPPED_CONFIG_KEYS = (
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "quantization_config",
)
_KERNELS = model_lib.ATTN_KERNELS + model_lib.MLP_KERNELS


class ExportError(ValueError):
    """An export that cannot be written: a bad destination, dtype or model/expert pairing."""


def export_expert(
    loaded: LoadedModel,
    expert: experts_lib.Expert | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    cache_root: str | os.PathLike | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Checks that `expert` fits `loaded`, decomposes its targets (cached, see
    `t2jax.svf.cache.loaded_model_factors`) and writes the merged model with `export_hf`.

    Args:
        loaded: the model (load it in float32 for an exact export).
        expert: the expert to merge; None exports the base model.
        out_dir, dtype, overwrite: see `export_hf`.
        cache_root: where SVD factors are cached (default `svf_cache.default_cache_root()`).
        progress: show progress bars.

    Raises:
        ExportError, experts_lib.ExpertError, svf_cache.FingerprintError: see `export_hf`; the
            expert is checked before anything is decomposed or written.
    """
    files.check_destination(pathlib.Path(out_dir), overwrite)
    factors = None
    if expert is not None:
        experts_lib.check_shapes(expert, loaded.config)
        svf_cache.check_fingerprint(expert.fingerprint, model_fingerprint(loaded), "this expert")
        factors = svf_cache.loaded_model_factors(
            loaded, expert.targets, cache_root=cache_root, progress=progress
        )
    return export_hf(loaded, factors, expert, out_dir, dtype=dtype, overwrite=overwrite)


def export_hf(
    loaded: LoadedModel,
    factors: svf_factors.ModelFactors | None,
    expert: experts_lib.Expert | svf_lib.ZVectors | None,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes `loaded` with W'(z) merged into its target kernels as an HF checkpoint directory.

    Args:
        loaded: the model (see `t2jax.loading.load_model`). W' is composed in fp32 and rounded to
            the weights' dtype before `dtype`: load in float32 for an exact float32 export.
        factors: SVD factors of the expert's targets (`svf_cache.loaded_model_factors`); may be
            None when `expert` is None and the weights hold every kernel.
        expert: an `Expert` (checked with `experts_lib.check_compatible`), its scales z
            {key: [L, R]} (`expert.z()`), or None for the base model.
        out_dir: the directory to create; its parent is created if needed.
        dtype: "float32" or "bfloat16", the dtype of the saved tensors.
        overwrite: replace an existing non-empty `out_dir` (otherwise an error).

    Returns:
        `out_dir`, complete.

    Raises:
        ExportError: an existing non-empty `out_dir` without `overwrite`, an unknown dtype,
            factors of another model, or weights that lack kernels and no factors to rebuild them.
        experts_lib.ExpertError, svf_cache.FingerprintError: the expert does not fit the model.
        t2jax.svf.targets.SVDError: z does not match the factors.
    """
    out = pathlib.Path(out_dir)
    saved_dtype = _saved_dtype(dtype)
    files.check_destination(out, overwrite)
    z = _checked_z(loaded, factors, expert)
    hf_config = export_config(loaded.checkpoint, dtype, out / "config.json")
    weights = loaded.weights
    if z is not None:
        weights = svf_factors.merge_into_weights(weights, factors, z)
    tensors = hf_tensors(loaded.config, weights, saved_dtype)

    def write(directory: pathlib.Path) -> None:
        safetensors.numpy.save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        _write_architecture(directory, loaded.checkpoint, hf_config)

    files.write_directory(out, write, overwrite=overwrite)
    return out


def export_architecture(
    checkpoint: Checkpoint, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> pathlib.Path:
    """Writes a checkpoint's architecture without its weights: config.json,
    generation_config.json and the tokenizer files, which `load_checkpoint("random:DIR")` turns
    into a model with random weights (see `t2jax.checkpoints.synthetic`) where the real weights
    cannot travel. No tensor is read.

    Raises:
        ExportError: an existing non-empty `out_dir` without `overwrite`.
    """
    out = pathlib.Path(out_dir)
    files.check_destination(out, overwrite)
    hf_config = export_config(checkpoint, "bfloat16", out / "config.json")
    files.write_directory(
        out,
        lambda directory: _write_architecture(directory, checkpoint, hf_config),
        overwrite=overwrite,
    )
    return out


def _write_architecture(
    directory: pathlib.Path, checkpoint: Checkpoint, hf_config: Mapping[str, Any]
) -> None:
    """The files of a checkpoint directory beside its weights."""
    _write_json(directory / "config.json", hf_config)
    _write_json(directory / "generation_config.json", generation_config(checkpoint))
    checkpoint.tokenizer.save_pretrained(str(directory))


def model_fingerprint(loaded: LoadedModel) -> str:
    """The fingerprint (`svf_cache.fingerprint`) of the loaded weights."""
    tensors = svf_cache.weights_as_tensors(loaded.config, loaded.weights)
    return svf_cache.fingerprint(loaded.config, tensors)


def _saved_dtype(dtype: Any) -> np.dtype:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in SAVED_DTYPES:
        raise ExportError(f"cannot save weights as {dtype!r}; choose one of {list(SAVED_DTYPES)}")
    return SAVED_DTYPES[name]


def _checked_z(
    loaded: LoadedModel,
    factors: svf_factors.ModelFactors | None,
    expert: experts_lib.Expert | svf_lib.ZVectors | None,
) -> svf_lib.ZVectors | None:
    """The z to merge (None: the weights as they are), after checking it fits the model."""
    if factors is None:
        if expert is not None:
            raise ExportError("merging an expert needs the SVD factors of its targets")
        return None
    svf_cache.check_fingerprint(factors.fingerprint, model_fingerprint(loaded), "the SVD factors")
    if isinstance(expert, experts_lib.Expert):
        experts_lib.check_compatible(expert, factors)
        return expert.z()
    if expert is None:
        if _missing_kernels(loaded.weights):
            ranks = factors.ranks()  # dropped kernels come back as W'(1) = W
            return {k: jnp.ones((factors.num_layers, r), jnp.float32) for k, r in ranks.items()}
        return None
    svf_factors.svf_from_factors(factors, expert, "merged")  # raises SVDError on a mismatch
    return expert


def _missing_kernels(weights: model_lib.Weights) -> list[str]:
    first = weights.layers if model_lib.is_stacked(weights.layers) else weights.layers[0]
    return [key for key in _KERNELS if key not in first]


# ----------------------------------------------------------------------------------------------
# Files: config, generation config, tensors.


def export_config(checkpoint: Checkpoint, dtype: str, path: pathlib.Path) -> dict[str, Any]:
    """The `config.json` dict: the checkpoint's HF config with the architecture spelled out (so
    transformers' defaults never stand in for t2jax's), checked to load back as the same
    `ModelConfig`.

    Raises:
        ExportError: the dict would load as a different architecture (a bug, never written).
    """
    config = checkpoint.config
    hf = {k: v for k, v in checkpoint.hf_config.items() if k not in _DROPPED_CONFIG_KEYS}
    hf.update(
        architectures=[ARCHITECTURES[config.model_type]],
        model_type=config.model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
        dtype=dtype,
    )
    if "rope_parameters" not in hf:
        hf["rope_theta"] = config.rope_theta
        if config.rope_scaling is not None and not hf.get("rope_scaling"):
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    if config.model_type != "qwen2":
        hf["attention_bias"] = config.o_bias
    if config.sliding_window is not None:
        hf["sliding_window"] = config.sliding_window
    tokenizer = checkpoint.tokenizer
    if "bos_token_id" not in hf and tokenizer.bos_token_id is not None:
        hf["bos_token_id"] = tokenizer.bos_token_id
    if "eos_token_id" not in hf and checkpoint.eos_token_ids:
        hf["eos_token_id"] = checkpoint.eos_token_ids[0]
    reloaded = model_config_from_hf(hf, path)
    if reloaded != config:
        raise ExportError(f"the exported config would load as {reloaded}, not {config}")
    return hf


def generation_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """`generation_config.json`: every end id (transformers stops on any of them), bos and pad."""
    tokenizer = checkpoint.tokenizer
    values = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": list(checkpoint.eos_token_ids),
        "pad_token_id": tokenizer.pad_token_id,
    }
    return {key: value for key, value in values.items() if value is not None}


def hf_tensors(
    config: ModelConfig, weights: model_lib.Weights, dtype: np.dtype
) -> dict[str, np.ndarray]:
    """HF-named host tensors in `[out, in]` orientation: the inverse of
    `t2jax.loading.weights_from_hf`, for stacked or unstacked layers.

    Raises:
        ExportError: a tensor the config requires is missing from `weights`.
    """

    def host(array: Any, transpose: bool = False) -> np.ndarray:
        array = np.asarray(jax.device_get(array))
        return np.ascontiguousarray((array.T if transpose else array).astype(dtype))

    if model_lib.is_stacked(weights.layers):
        stacked = {key: np.asarray(jax.device_get(x)) for key, x in weights.layers.items()}
        layers = [{key: x[i] for key, x in stacked.items()} for i in range(config.num_layers)]
    else:
        layers = list(weights.layers)
    if len(layers) != config.num_layers:
        raise ExportError(f"the weights have {len(layers)} layers, the config {config.num_layers}")
    tensors = {"model.embed_tokens.weight": host(weights.embed)}
    for index, layer in enumerate(layers):
        for key, name in hf_layer_tensor_names(config, index).items():
            if key not in layer:
                raise ExportError(
                    f"the weights lack {name}; load the model without `skip`, or pass the SVD "
                    "factors of the dropped kernels"
                )
            tensors[name] = host(layer[key], transpose=key in _KERNELS)
    tensors["model.norm.weight"] = host(weights.final_norm)
    if not config.tie_word_embeddings:
        if weights.lm_head is None:
            raise ExportError("the config has an untied lm_head but the weights have none")
        tensors["lm_head.weight"] = host(weights.lm_head, transpose=True)
    return tensors


# ----------------------------------------------------------------------------------------------
# The directory, written all at once.


def _write_json(path: pathlib.Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")

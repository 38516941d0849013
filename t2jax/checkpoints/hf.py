"""Hugging Face checkpoints: a local directory (`config.json`, `*.safetensors`, tokenizer files) or
a hub id, downloaded with `huggingface_hub` when the machine is online."""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import huggingface_hub
import numpy as np
import safetensors
import transformers
from huggingface_hub import errors as hub_errors

from t2jax.checkpoints.common import (
    Checkpoint,
    CheckpointError,
    LazyTensors,
    check_tensor_layout,
    end_of_sequence_ids,
    ensure_pad_token,
    format_names,
)
from t2jax.config import ModelConfig
from t2jax.configuration import ConfigError

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Any one of these makes a directory loadable by `AutoTokenizer`.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Buffers some older checkpoints store beside the weights; they are recomputed, never loaded.
_IGNORED_TENSOR_SUFFIXES = (".rotary_emb.inv_freq",)
# What a hub download fetches: configs, weights, tokenizer and chat template, and nothing else
# (no PyTorch .bin duplicates, no `original/` or `consolidated` copies).
_HUB_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer*", "merges.txt")
_HUB_IGNORE_PATTERNS = ("original/*", "consolidated*")


def load_hf_dir(path: str | pathlib.Path, source: str | None = None) -> Checkpoint:
    """Loads an HF checkpoint directory; tensors are read lazily from its safetensors files.

    Args:
        path: a directory with `config.json`, `*.safetensors` (one file or sharded with
            `model.safetensors.index.json`) and tokenizer files.
        source: how to describe the checkpoint's origin; defaults to the directory.

    Returns:
        The checkpoint, after checking every tensor name and shape against the config.

    Raises:
        CheckpointError: a missing or unreadable file, an unsupported config, or tensors that
            do not match the config.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    hf_config = read_json(directory / "config.json")
    config = model_config_from_hf(hf_config, directory / "config.json")

    locations = tensor_locations(directory)
    if config.tie_word_embeddings:
        # Tied checkpoints sometimes store the shared matrix twice; the embedding is canonical.
        locations.pop("lm_head.weight", None)
    shapes = {name: shape for name, (_, shape) in locations.items()}
    check_tensor_layout(shapes, config, str(directory))

    tokenizer = load_hf_tokenizer(directory)
    return Checkpoint(
        config=config,
        hf_config=hf_config,
        tensors=LazyTensors(shapes, lambda name: read_safetensor(locations[name][0], name)),
        tokenizer=tokenizer,
        source=source or str(directory),
        eos_token_ids=read_end_of_sequence_ids(directory, hf_config, tokenizer),
    )


def read_end_of_sequence_ids(
    directory: pathlib.Path,
    hf_config: Mapping[str, Any],
    tokenizer: transformers.PreTrainedTokenizerBase,
) -> tuple[int, ...]:
    """Every end id of a checkpoint directory: the tokenizer's, config.json's and
    generation_config.json's (when present)."""
    generation_config_path = directory / "generation_config.json"
    generation_config = read_json(generation_config_path) if generation_config_path.exists() else {}
    return end_of_sequence_ids(
        tokenizer, hf_config.get("eos_token_id"), generation_config.get("eos_token_id")
    )


def read_json(path: pathlib.Path) -> dict[str, Any]:
    """Reads a JSON object from a file, with errors that name the file."""
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a {type(value).__name__}, expected a JSON object")
    return value


def model_config_from_hf(hf_config: Mapping[str, Any], path: pathlib.Path) -> ModelConfig:
    """`ModelConfig.from_hf`, with errors that name the config's file."""
    try:
        return ModelConfig.from_hf(hf_config)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from err
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a usable model config: {err!r}") from err


def tensor_locations(directory: pathlib.Path) -> dict[str, tuple[pathlib.Path, tuple[int, ...]]]:
    """Maps every tensor of a checkpoint directory to its file and shape, reading headers only.

    Args:
        directory: holds either `model.safetensors.index.json` and its shards, or one or more
            `*.safetensors` files.

    Returns:
        Tensor name -> (file, shape), in file order.

    Raises:
        CheckpointError: no safetensors files, a shard the index names is missing, a corrupt or
            truncated file, a tensor stored twice, or an index that disagrees with its shards.
    """
    index_path = directory / SAFETENSORS_INDEX
    if index_path.exists():
        weight_map = read_json(index_path).get("weight_map") or {}
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    else:
        weight_map = None
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors weights in {directory} (PyTorch .bin checkpoints are not supported; "
            "convert them with transformers' save_pretrained)"
        )
    locations: dict[str, tuple[pathlib.Path, tuple[int, ...]]] = {}
    for file in files:
        for name, shape in safetensors_header(file).items():
            if name.endswith(_IGNORED_TENSOR_SUFFIXES):
                continue
            if name in locations:
                raise CheckpointError(
                    f"tensor {name} is stored in both {locations[name][0]} and {file}"
                )
            locations[name] = (file, shape)
    if weight_map is not None:
        _check_index(weight_map, locations, index_path)
    return locations


def _check_index(
    weight_map: Mapping[str, str],
    locations: Mapping[str, tuple[pathlib.Path, tuple[int, ...]]],
    index_path: pathlib.Path,
) -> None:
    wrong = [
        f"{name} (index says {shard})"
        for name, shard in weight_map.items()
        if not name.endswith(_IGNORED_TENSOR_SUFFIXES)
        and (name not in locations or locations[name][0].name != shard)
    ]
    if wrong:
        raise CheckpointError(
            f"{index_path} names tensors its shards do not hold: {format_names(wrong)}"
        )


def safetensors_header(file: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one safetensors file, without reading tensor data.

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    if not file.is_file():
        raise CheckpointError(f"missing weights file {file}")
    try:
        with safetensors.safe_open(file, framework="np") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError) as err:
        raise CheckpointError(
            f"cannot read {file} (truncated or corrupt safetensors?): {err}"
        ) from err


def read_safetensor(file: pathlib.Path, name: str) -> np.ndarray:
    """Reads one tensor from a safetensors file, in its stored dtype (bf16 as ml_dtypes)."""
    try:
        with safetensors.safe_open(file, framework="np") as handle:
            return handle.get_tensor(name)
    except (safetensors.SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read tensor {name} from {file}: {err}") from err


def load_hf_tokenizer(directory: pathlib.Path) -> transformers.PreTrainedTokenizerBase:
    """Loads the fast tokenizer (and chat template) saved in a checkpoint directory.

    Raises:
        CheckpointError: the directory has no tokenizer files, or transformers cannot load them.
    """
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer in {directory}: expected one of {', '.join(TOKENIZER_FILES)}"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the tokenizer in {directory}: {err}") from err
    ensure_pad_token(tokenizer)
    return tokenizer


def download_from_hub(repo_id: str, alternatives: str) -> pathlib.Path:
    """Downloads (or finds in the local HF cache) a hub checkpoint's configs, weights and
    tokenizer.

    Args:
        repo_id: a hub id such as `"HuggingFaceTB/SmolLM2-135M-Instruct"`.
        alternatives: what the user can load instead, for the offline error message.

    Returns:
        The local snapshot directory.

    Raises:
        CheckpointError: offline (HF_HUB_OFFLINE=1 or no network) and not cached, or the hub
            refuses the request (unknown or gated repository).
    """
    try:
        return pathlib.Path(
            huggingface_hub.snapshot_download(
                repo_id,
                allow_patterns=list(_HUB_ALLOW_PATTERNS),
                ignore_patterns=list(_HUB_IGNORE_PATTERNS),
            )
        )
    except hub_errors.LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{repo_id!r} looks like a Hugging Face hub id, but the hub is unreachable (offline "
            f"mode or no network) and it is not in the local HF cache. {alternatives}. ({err})"
        ) from err
    except (hub_errors.HfHubHTTPError, OSError) as err:
        raise CheckpointError(
            f"cannot download {repo_id!r} from the Hugging Face hub: {err}"
        ) from err

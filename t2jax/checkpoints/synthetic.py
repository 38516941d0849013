"""Checkpoints with random weights: a model's architecture and tokenizer without its weights.

Throughput and memory depend on a model's shapes, not on its values, so a benchmark can run on a
machine that the real weights cannot reach (a lent accelerator, an 8B architecture whose weights
were never downloaded). `load_checkpoint("random:DIR")` reads `DIR/config.json` and the tokenizer
files in DIR (`t2jax export --architecture-only` writes them) and makes every tensor the config
implies: norm scales are ones, everything else is N(0, 0.02^2), the same values on every load
(seeded by the tensor's name), generated on lookup like any checkpoint's lazy tensors.
What such a model generates is noise: use it for timing and memory, never for accuracy.
"""

from __future__ import annotations

import pathlib
import zlib

import numpy as np

from t2jax.checkpoints.common import Checkpoint, CheckpointError, LazyTensors, expected_hf_shapes
from t2jax.checkpoints.hf import (
    load_hf_tokenizer,
    model_config_from_hf,
    read_end_of_sequence_ids,
    read_json,
)

PREFIX = "random:"
# Values are tiled from a block of this many draws: a 1 GB embedding costs a copy, not 500M draws.
_BLOCK_SIZE = 1 << 20
_STD = 0.02


def load_random_dir(path: str | pathlib.Path) -> Checkpoint:
    """A checkpoint of the architecture in `path` (config.json + tokenizer) with random weights.

    Raises:
        CheckpointError: a missing directory, config or tokenizer, or an unsupported config.
    """
    directory = pathlib.Path(path).expanduser()
    if not directory.is_dir():
        raise CheckpointError(f"architecture directory {directory} does not exist")
    hf_config = read_json(directory / "config.json")
    config = model_config_from_hf(hf_config, directory / "config.json")
    shapes = expected_hf_shapes(config)
    tokenizer = load_hf_tokenizer(directory)
    return Checkpoint(
        config=config,
        hf_config=hf_config,
        tensors=LazyTensors(shapes, lambda name: random_tensor(name, shapes[name])),
        tokenizer=tokenizer,
        source=f"random weights with the architecture in {directory}",
        eos_token_ids=read_end_of_sequence_ids(directory, hf_config, tokenizer),
    )


def random_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor `name` of a random checkpoint: ones for a norm scale, otherwise
    N(0, 0.02^2) draws seeded by the name (tiled when the tensor is larger than one block)."""
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    size = int(np.prod(shape))
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    block = _STD * rng.standard_normal(min(size, _BLOCK_SIZE), dtype=np.float32)
    return np.resize(block, size).reshape(shape)

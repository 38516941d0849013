"""GGUF files (llama.cpp): dequantized weights under HF names, an HF config dict synthesized from
the metadata, and a fast tokenizer built from the metadata, all without torch.

llama.cpp permutes the rows of `attn_q` and `attn_k` in `llama`-architecture files (it pairs the
rotary halves as interleaved neighbours); `unpermute_rows` restores HF's rotate-half layout. `qwen2`
files are stored unpermuted.
"""

from __future__ import annotations

import logging
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np
import transformers
from transformers.integrations import GGUF_CONFIG_MAPPING

from t2jax.checkpoints.common import (
    Checkpoint,
    CheckpointError,
    LazyTensors,
    check_tensor_layout,
    end_of_sequence_ids,
    ensure_pad_token,
)
from t2jax.checkpoints.hf import model_config_from_hf
from t2jax.config import ModelConfig

logger = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
# Architectures whose q/k rows llama.cpp's converter permutes.
_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


def load_gguf(path: str | pathlib.Path, source: str | None = None) -> Checkpoint:
    """Loads a `llama` or `qwen2` GGUF file; tensors are dequantized lazily to float32.

    Args:
        path: the `.gguf` file.
        source: how to describe the checkpoint's origin; defaults to the file path.

    Returns:
        The checkpoint, after checking every tensor name and shape against the config.

    Raises:
        CheckpointError: a missing or corrupt file, an unsupported architecture or tokenizer, or
            tensors that do not match the metadata.
    """
    file = pathlib.Path(path)
    if not file.is_file():
        raise CheckpointError(f"GGUF file {file} does not exist")
    logger.info("reading GGUF metadata from %s", file)
    reader = open_gguf(file)
    metadata = read_metadata(reader)
    if "tokenizer.ggml.tokens" not in metadata:
        raise CheckpointError(f"{file} has no tokenizer (no tokenizer.ggml.tokens metadata)")
    arch = metadata.get("general.architecture")
    gguf_tensors = {tensor.name: tensor for tensor in reader.tensors}
    hf_config = hf_config_from_gguf(metadata, tuple(gguf_tensors), file)
    config = model_config_from_hf(hf_config, file)

    hf_to_gguf = {hf_tensor_name(name): name for name in gguf_tensors}
    shapes = {hf: tuple(reversed(gguf_tensors[g].shape.tolist())) for hf, g in hf_to_gguf.items()}
    check_tensor_layout(shapes, config, str(file))

    row_heads = permuted_row_heads(config) if arch in _PERMUTED_ARCHITECTURES else {}

    def read(name: str) -> np.ndarray:
        return dequantize(gguf_tensors[hf_to_gguf[name]], shapes[name], row_heads.get(name))

    tokenizer = tokenizer_from_gguf(metadata)
    return Checkpoint(
        config=config,
        hf_config=hf_config,
        tensors=LazyTensors(shapes, read),
        tokenizer=tokenizer,
        source=source or str(file),
        eos_token_ids=end_of_sequence_ids(tokenizer, hf_config.get("eos_token_id")),
    )


def permuted_row_heads(config: ModelConfig) -> dict[str, int]:
    """HF names of the q/k weights whose rows llama.cpp permutes, with the head count of each."""
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    return {
        f"model.layers.{layer}.self_attn.{proj}.weight": count
        for layer in range(config.num_layers)
        for proj, count in heads.items()
    }


def dequantize(tensor: gguf.ReaderTensor, shape: tuple[int, ...], heads: int | None) -> np.ndarray:
    """Dequantizes one GGUF tensor to float32 `shape`, un-permuting its rows over `heads` heads
    when given."""
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    return weight if heads is None else unpermute_rows(weight, heads)


def open_gguf(file: pathlib.Path) -> gguf.GGUFReader:
    """Opens a GGUF file (memory-mapped), with a clear error for truncated or foreign files."""
    try:
        return gguf.GGUFReader(file)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise CheckpointError(
            f"cannot read {file} as a GGUF file (truncated or corrupt?): {err}"
        ) from err


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its decoded value (strings, numbers, lists)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def hf_config_from_gguf(
    metadata: Mapping[str, Any], tensor_names: tuple[str, ...], file: pathlib.Path
) -> dict[str, Any]:
    """Synthesizes the HF `config.json` dict that a GGUF file's metadata describes.

    Uses transformers' own key table (`GGUF_CONFIG_MAPPING`) for the `<arch>.*` keys.

    Args:
        metadata: the decoded GGUF metadata.
        tensor_names: the GGUF tensor names (an absent `output.weight` means tied embeddings).
        file: the GGUF file, for error messages.

    Returns:
        An HF config dict that `ModelConfig.from_hf` accepts.

    Raises:
        CheckpointError: an architecture other than `SUPPORTED_GGUF_ARCHITECTURES`.
    """
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{file}: unsupported GGUF architecture {arch!r}; t2jax loads GGUF architectures "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    config: dict[str, Any] = {"model_type": arch}
    for gguf_key, hf_key in GGUF_CONFIG_MAPPING[arch].items():
        if hf_key not in (None, -1) and f"{arch}.{gguf_key}" in metadata:
            config[hf_key] = metadata[f"{arch}.{gguf_key}"]
    config.setdefault("vocab_size", len(metadata["tokenizer.ggml.tokens"]))
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    if rope_scaling := _rope_scaling(metadata, arch):
        config["rope_scaling"] = rope_scaling
    for key in ("bos_token_id", "eos_token_id"):
        if (token_id := metadata.get(f"tokenizer.ggml.{key}")) is not None:
            config[key] = token_id
    return config


def _rope_scaling(metadata: Mapping[str, Any], arch: str) -> dict[str, Any] | None:
    """The HF `rope_scaling` dict for `<arch>.rope.scaling.*` keys (`ModelConfig.from_hf` rejects
    types it cannot run)."""
    rope_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if rope_type == "none":
        return None
    scaling = {"rope_type": rope_type, "factor": metadata.get(f"{arch}.rope.scaling.factor")}
    if (original := metadata.get(f"{arch}.rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def hf_tensor_name(gguf_name: str) -> str:
    """The HF name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj
    .weight`); names without an HF counterpart are returned unchanged, so the layout check
    reports them as unexpected."""
    if match := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in _LAYER_TENSOR_NAMES:
            return f"model.layers.{layer}.{_LAYER_TENSOR_NAMES[part]}.{kind}"
    elif (match := _GLOBAL_TENSOR.fullmatch(gguf_name)) and match[1] in _GLOBAL_TENSOR_NAMES:
        return f"{_GLOBAL_TENSOR_NAMES[match[1]]}.{match[2]}"
    return gguf_name


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation.

    llama.cpp's converter views each head's rows as `(2, head_dim / 2)` (the two rotary halves)
    and stores them transposed, `(head_dim / 2, 2)`, so rotary pairs are adjacent rows. This
    transposes them back.

    Args:
        weight: `[num_heads * head_dim, in]` rows as stored in the GGUF file.
        num_heads: query heads for `attn_q`, key/value heads for `attn_k`.

    Returns:
        The weight in HF's rotate-half row order, same shape.
    """
    half_head = weight.shape[0] // num_heads // 2
    per_head = weight.reshape(num_heads, half_head, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> transformers.PreTrainedTokenizerFast:
    """Builds the fast tokenizer a GGUF file describes, the way transformers' GGUF path does,
    without torch.

    Args:
        metadata: the decoded GGUF metadata.

    Returns:
        A fast tokenizer with the file's chat template, bos/eos/unk/pad tokens and add-bos flag.

    Raises:
        CheckpointError: an unsupported tokenizer model.
    """
    # Imported here, not with the module: transformers before 5.23 lacks the mapping, and HF
    # directories and random:DIR checkpoints load without it (e.g. on a GPU image's transformers).
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    tokenizer_dict, tokenizer_config = (
        {
            hf_key: metadata[f"tokenizer.{gguf_key}"]
            for gguf_key, hf_key in GGUF_TOKENIZER_MAPPING[group].items()
            if f"tokenizer.{gguf_key}" in metadata
        }
        for group in ("tokenizer", "tokenizer_config")
    )
    try:
        backend, extra_kwargs = convert_gguf_tokenizer(
            metadata["general.architecture"], tokenizer_dict
        )
    except ValueError as err:
        raise CheckpointError(f"cannot build the GGUF tokenizer: {err}") from err
    tokens = tokenizer_dict["tokens"]
    special_tokens = {
        name: tokens[tokenizer_dict[f"{name}_id"]]
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if f"{name}_id" in tokenizer_dict
    }
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, **extra_kwargs, **tokenizer_config, **special_tokens
    )
    ensure_pad_token(tokenizer)
    return tokenizer

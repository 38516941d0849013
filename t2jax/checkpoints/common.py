"""What every checkpoint format produces: the `Checkpoint` record, its lazy tensor mapping, the
expected HF tensor layout of a `ModelConfig`, and the checks that a file matches it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import transformers

from t2jax import model as model_lib
from t2jax.config import ModelConfig

# Token strings that end a turn in the chat formats we know (ChatML, Llama 3, Gemma). A GGUF names
# only one eos id; llama.cpp also stops on these, and so do the models' HF generation configs.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>")

# How many names an error message lists before it only counts the rest.
_NAMES_SHOWN = 8


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, or does not match its config."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded model: config, HF-named weights, tokenizer, and stop ids.

    Attributes:
        config: the architecture, as t2jax's decoder reads it.
        hf_config: the HF `config.json` dict (synthesized from the metadata for a GGUF file).
        tensors: HF tensor name -> array in HF orientation (`[out, in]` for linear layers), read
            lazily one tensor at a time. It is a `LazyTensors`: `tensors.shapes` gives every
            shape without reading data.
        tokenizer: a fast tokenizer with its chat template and bos/eos/pad tokens set.
        source: where the checkpoint came from, for humans.
        eos_token_ids: every token id that ends generation.
    """

    config: ModelConfig
    hf_config: dict
    tensors: Mapping[str, np.ndarray]
    tokenizer: transformers.PreTrainedTokenizerBase
    source: str
    eos_token_ids: tuple[int, ...]


class LazyTensors(Mapping[str, np.ndarray]):
    """A read-only mapping that reads a tensor from disk only when it is looked up.

    Args:
        shapes: tensor name -> shape, in the order the tensors should be iterated.
        read: reads one tensor by name; called on every lookup (nothing is cached, so an 8B
            model never has to fit in host memory at once).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], np.ndarray]):
        self._shapes = dict(shapes)
        self._read = read

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, known without reading any tensor data."""
        return dict(self._shapes)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._shapes:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def hf_layer_tensor_names(config: ModelConfig, layer: int) -> dict[str, str]:
    """Maps our per-layer keys to the HF tensor names of layer `layer`."""
    prefix = f"model.layers.{layer}."
    names = {
        key: f"{prefix}{key}.weight"
        for key in model_lib.ATTN_KERNELS + model_lib.MLP_KERNELS + model_lib.LAYER_NORMS
    }
    if config.qkv_bias:
        names.update({key: f"{prefix}{key}" for key in model_lib.QKV_BIASES})
    if config.o_bias:
        names["self_attn.o_proj.bias"] = f"{prefix}self_attn.o_proj.bias"
    return names


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF tensor names and [out, in] shapes that a checkpoint of `config` must contain."""
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_dim, config.kv_dim
    per_layer = {
        "self_attn.q_proj": (q, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
        "input_layernorm": (d,),
        "post_attention_layernorm": (d,),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (d,),
    }
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for layer in range(config.num_layers):
        for key, name in hf_layer_tensor_names(config, layer).items():
            shapes[name] = per_layer[key]
    return shapes


def check_tensor_layout(
    found: Mapping[str, tuple[int, ...]], config: ModelConfig, source: str
) -> None:
    """Checks that a checkpoint holds exactly the tensors its config implies, with their shapes.

    Args:
        found: tensor name -> shape as stored in the checkpoint.
        config: the architecture the tensors must match.
        source: the checkpoint's path, for the error message.

    Raises:
        CheckpointError: listing missing tensors, unexpected tensors and shape mismatches.
    """
    expected = expected_hf_shapes(config)
    problems = []
    if missing := [name for name in expected if name not in found]:
        problems.append(f"missing tensors: {format_names(missing)}")
    if unexpected := [name for name in found if name not in expected]:
        problems.append(f"unexpected tensors: {format_names(unexpected)}")
    mismatched = [
        f"{name} has shape {tuple(found[name])}, expected {expected[name]}"
        for name in expected
        if name in found and tuple(found[name]) != expected[name]
    ]
    if mismatched:
        problems.append(f"shape mismatches vs config: {format_names(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))


def format_names(names: list[str]) -> str:
    """A comma-separated list of names, cut after the first few with a count of the rest."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown


def collect_token_ids(*candidates: Any) -> tuple[int, ...]:
    """Flattens token ids given as ints, lists of ints or None; keeps first-seen order, no repeats.

    Args:
        *candidates: each an int, an iterable of ints, or None.

    Returns:
        The distinct ids in the order they first appear.
    """
    ids: dict[int, None] = {}
    for candidate in candidates:
        if candidate is None:
            continue
        for value in candidate if isinstance(candidate, Iterable) else [candidate]:
            ids.setdefault(int(value))
    return tuple(ids)


def end_of_sequence_ids(
    tokenizer: transformers.PreTrainedTokenizerBase, *declared: Any
) -> tuple[int, ...]:
    """All ids that end generation: the declared ones, the tokenizer's eos, and known end-of-turn
    tokens (`END_OF_TURN_TOKENS`) that the tokenizer holds as special tokens.

    Args:
        tokenizer: the checkpoint's tokenizer.
        *declared: eos ids from the checkpoint's configs (ints, lists of ints or None).

    Returns:
        The distinct ids, declared ones first.
    """
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    end_of_turn = [tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in special]
    return collect_token_ids(*declared, tokenizer.eos_token_id, end_of_turn)


def ensure_pad_token(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Uses the eos token for padding when the tokenizer defines no pad token (Llama 3, SmolLM).

    The decoder carries explicit attention masks, so the pad id only fills unused positions.
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token

"""Tiny random checkpoints for tests: transformers models saved with `save_pretrained`, a byte-level
tokenizer with a ChatML template, and the t2jax objects that load them."""

from __future__ import annotations

import pathlib

import numpy as np
import tokenizers
import transformers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 272  # 256 bytes + specials, rounded up
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=4096,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# name -> (transformers config class, model class, config overrides)
TINY_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_mha_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"num_key_value_heads": 4, "tie_word_embeddings": True},
    ),
    "llama3_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0},
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2_untied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
}


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges (one token per byte) plus ChatML specials."""
    byte_symbols = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_symbols))}
    model = tokenizers.models.BPE(vocab=vocab, merges=[])
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def make_torch_model(kind: str, seed: int = 0):
    """A random transformers model of the given TINY_MODELS kind (eval mode, fp32)."""
    import torch

    config_class, model_class, overrides = TINY_MODELS[kind]
    config = getattr(transformers, config_class)(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # random norms and biases, so a wrong norm or bias shows up in logits
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param) if "norm" in name else param + 0.1)
    return model


def save_tiny_checkpoint(directory: pathlib.Path, kind: str, seed: int = 0, **save_kwargs):
    """Saves a tiny random model and the tiny tokenizer; returns the torch model."""
    model = make_torch_model(kind, seed)
    model.save_pretrained(directory, **save_kwargs)
    tiny_tokenizer().save_pretrained(directory)
    return model


def random_padded_batch(seed: int, rows: int, length: int, pads: tuple[int, ...]):
    """Random token ids [rows, length] and a left-padding mask with `pads[i]` pads in row i."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 256, (rows, length))
    mask = np.ones((rows, length), bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return tokens, mask


def early_end_ids(
    token_ids: list[list[int]], rows: list[int], never_in: list[int], within: int
) -> tuple[int, ...]:
    """End ids, from a free generation, that end each of `rows` within its first `within` tokens
    and never occur in rows `never_in` (which therefore run on)."""
    avoided = {token for row in never_in for token in token_ids[row]}
    ends = set()
    for row in rows:
        candidates = [t for t in token_ids[row][:within] if t not in avoided]
        assert candidates, f"row {row} has no early token that rows {never_in} never generate"
        ends.add(candidates[0])
    return tuple(sorted(ends))

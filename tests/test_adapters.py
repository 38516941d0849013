"""LoRA / IA3 / DoRA in t2jax's forward against HF PEFT on tiny random Llama and Qwen2 models:
shared adapters, merged kernels and one adapter per row; exact parameter counts; PEFT's file
format both ways, with clear errors for bad adapters."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tiny

from t2jax import files
from t2jax import model as model_lib
from t2jax.adapters import core as adapters
from t2jax.adapters import peft_format
from t2jax.loading import load_model
from t2jax.plan import models as plan_models
from t2jax.svf import targets as svf_targets

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.torch
TOLERANCE = 1e-4
LORA_MODULES = ["q_proj", "v_proj", "down_proj"]
IA3_MODULES = ["k_proj", "v_proj", "down_proj"]


def _hf_key(module: str) -> str:
    """ "q_proj" -> "self_attn.q_proj", "down_proj" -> "mlp.down_proj"."""
    return (
        f"mlp.{module}"
        if module in ("gate_proj", "up_proj", "down_proj")
        else f"self_attn.{module}"
    )


def _peft_config(method: str):
    if method == "ia3":
        return peft.IA3Config(target_modules=IA3_MODULES, feedforward_modules=["down_proj"])
    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LORA_MODULES, lora_dropout=0.0, use_dora=method == "dora"
    )


def peft_model(directory, kind: str, method: str, seed: int):
    """A tiny base model saved to `directory` (for t2jax) wrapped by PEFT with random, nonzero
    adapter weights (PEFT initializes LoRA's B and IA3's vectors to the identity)."""
    base = tiny.save_tiny_checkpoint(directory, kind, seed=0)
    model = peft.get_peft_model(base, _peft_config(method)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "lora_A" in name or "lora_B" in name:
                param.copy_(0.3 * noise)
            elif "ia3_l" in name or "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.3 * noise)
    return model


def adapters_from_peft(model, method: str) -> adapters.ModelAdapters:
    """t2jax adapters ([in, out] orientation, one `LayerAdapters` per layer) of a PEFT model."""

    def array(tensor) -> jax.Array:
        return jnp.asarray(tensor.detach().numpy())

    layers = []
    for layer in model.base_model.model.model.layers:
        targets = {}
        for module_name in IA3_MODULES if method == "ia3" else LORA_MODULES:
            key = _hf_key(module_name)
            module = layer.get_submodule(key)
            if method == "ia3":
                vector = array(module.ia3_l["default"]).reshape(-1)
                targets[key] = adapters.IA3Target(vector, module_name == "down_proj")
                continue
            a = array(module.lora_A["default"].weight).T  # [in, r]
            b = array(module.lora_B["default"].weight).T  # [r, out]
            scale = float(module.scaling["default"])
            if method == "lora":
                targets[key] = adapters.LoRATarget(a, b, scale)
            else:
                magnitude = array(module.lora_magnitude_vector["default"].weight)
                targets[key] = adapters.DoRATarget(a, b, magnitude, scale)
        layers.append(adapters.LayerAdapters(targets))
    return adapters.ModelAdapters(tuple(layers))


def batch():
    tokens, mask = tiny.random_padded_batch(seed=3, rows=2, length=9, pads=(0, 3))
    return jnp.asarray(tokens), jnp.asarray(mask)


def t2jax_logits(loaded, weights, adapter, tokens, mask) -> np.ndarray:
    positions = model_lib.positions_from_mask(mask)
    forward = jax.jit(model_lib.forward, static_argnums=0)
    hidden, _ = forward(loaded.config, weights, tokens, positions, mask, None, adapter)
    return np.asarray(model_lib.logits(weights, hidden))


def peft_logits(model, tokens, mask) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=torch.tensor(np.asarray(mask).astype(np.int64)),
        ).logits.numpy()


def merged_weights(weights: model_lib.Weights, adapter: adapters.ModelAdapters):
    """`weights` with every adapted kernel (and its bias) replaced by `adapters.merge` of it."""
    layers = []
    for layer, layer_adapter in zip(weights.layers, adapter.layers, strict=True):
        layer = dict(layer)
        for key, target in layer_adapter.targets.items():
            kernel, bias = adapters.merge(layer[key], layer.get(f"{key}.bias"), target)
            layer[key] = kernel
            if bias is not None:
                layer[f"{key}.bias"] = bias
        layers.append(layer)
    return model_lib.Weights(
        embed=weights.embed,
        layers=tuple(layers),
        final_norm=weights.final_norm,
        lm_head=weights.lm_head,
    )


@pytest.mark.parametrize("method", ["lora", "ia3", "dora"])
@pytest.mark.parametrize("kind", ["llama", "qwen2_untied"])
def test_adapter_forward_and_merge_match_peft(tmp_path, kind, method):
    model = peft_model(tmp_path / "model", kind, method, seed=1)
    loaded = load_model(str(tmp_path / "model"), dtype=jnp.float32, stacked=False, progress=False)
    adapter = adapters_from_peft(model, method)
    tokens, mask = batch()
    theirs = peft_logits(model, tokens, mask)
    ours = t2jax_logits(loaded, loaded.weights, adapter, tokens, mask)
    merged = t2jax_logits(loaded, merged_weights(loaded.weights, adapter), None, tokens, mask)
    base = t2jax_logits(loaded, loaded.weights, None, tokens, mask)
    rows = np.asarray(mask)
    difference = np.abs(ours - theirs)[rows].max()
    print(f"{kind} {method}: max |logit difference| vs PEFT {difference:.3g}")
    assert difference <= TOLERANCE
    assert np.abs(merged - theirs)[rows].max() <= TOLERANCE
    assert np.abs(base - theirs)[rows].max() > 100 * TOLERANCE, "the adapter changed nothing"


@pytest.mark.parametrize("method", ["lora", "ia3", "dora"])
def test_one_adapter_per_row_equals_each_row_alone(tmp_path, method):
    first = adapters_from_peft(peft_model(tmp_path / "a", "llama", method, seed=1), method)
    second = adapters_from_peft(peft_model(tmp_path / "b", "llama", method, seed=2), method)
    loaded = load_model(str(tmp_path / "a"), dtype=jnp.float32, stacked=False, progress=False)
    per_row = jax.tree.map(lambda x, y: jnp.stack([x, y]), first, second)  # [2, ...] leaves
    tokens, mask = batch()
    together = t2jax_logits(loaded, loaded.weights, per_row, tokens, mask)
    for row, adapter in enumerate((first, second)):
        alone = t2jax_logits(
            loaded, loaded.weights, adapter, tokens[row : row + 1], mask[row : row + 1]
        )
        np.testing.assert_allclose(
            together[row][np.asarray(mask[row])], alone[0][np.asarray(mask[row])], atol=1e-5
        )
    shared = t2jax_logits(loaded, loaded.weights, first, tokens, mask)
    assert np.abs(together[1] - shared[1])[np.asarray(mask[1])].max() > 1e-3


def test_stacked_layers_give_the_unstacked_logits(tmp_path):
    model = peft_model(tmp_path / "model", "llama", "dora", seed=1)
    adapter = adapters_from_peft(model, "dora")
    unstacked = load_model(
        str(tmp_path / "model"), dtype=jnp.float32, stacked=False, progress=False
    )
    stacked = load_model(str(tmp_path / "model"), dtype=jnp.float32, stacked=True, progress=False)
    stacked_adapter = adapters.ModelAdapters(
        jax.tree.map(lambda *xs: jnp.stack(xs), *adapter.layers)
    )
    tokens, mask = batch()
    np.testing.assert_allclose(
        t2jax_logits(stacked, stacked.weights, stacked_adapter, tokens, mask),
        t2jax_logits(unstacked, unstacked.weights, adapter, tokens, mask),
        atol=1e-5,
    )


def test_ia3_and_dora_parameter_counts():
    """Llama-3-8B (LoRA's counts: tests/test_svd.py): IA3 scales k and v outputs (1024 each) and
    down_proj's input (14336) per layer; DoRA adds one magnitude per output feature to LoRA."""
    config = plan_models.model_config("Llama-3-8B-Instruct")
    ia3 = [_hf_key(module) for module in IA3_MODULES]
    qv = svf_targets.resolve_targets("qv")
    assert svf_targets.adapter_param_count(config, "ia3", ia3) == (1024 + 1024 + 14336) * 32
    lora = svf_targets.adapter_param_count(config, "lora", qv, 16)
    assert svf_targets.adapter_param_count(config, "dora", qv, 16) == lora + (4096 + 1024) * 32
    with pytest.raises(ValueError, match="unknown adapter kind"):
        svf_targets.adapter_param_count(config, "bitfit", qv)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_peft_adapter_round_trips_through_t2jax(tmp_path, method):
    """PEFT saves an adapter; t2jax reads it (same logits as PEFT), writes it back, and
    `PeftModel.from_pretrained` loads t2jax's files to the same logits."""
    model = peft_model(tmp_path / "model", "qwen2_untied", method, seed=4)
    model.save_pretrained(tmp_path / "saved_by_peft")
    loaded = load_model(str(tmp_path / "model"), dtype=jnp.float32, stacked=False, progress=False)
    adapter = peft_format.load_peft(tmp_path / "saved_by_peft", loaded.config)
    tokens, mask = batch()
    theirs = peft_logits(model, tokens, mask)
    rows = np.asarray(mask)
    ours = t2jax_logits(loaded, loaded.weights, adapter, tokens, mask)
    assert np.abs(ours - theirs)[rows].max() <= TOLERANCE

    out = peft_format.save_peft(tmp_path / "saved_by_t2jax", adapter, loaded.config, alpha=8)
    base = tiny.make_torch_model("qwen2_untied", seed=0)
    reloaded = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert np.abs(peft_logits(reloaded, tokens, mask) - theirs)[rows].max() <= TOLERANCE
    assert not list(tmp_path.glob(".saved_by_t2jax.*")), "temporary directory left behind"


@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    model = peft_model(root / "model", "llama", "lora", seed=5)
    model.save_pretrained(root / "adapter")
    loaded = load_model(str(root / "model"), dtype=jnp.float32, stacked=False, progress=False)
    return root, loaded


def _broken_copy(source, target, edit_config=None, edit_tensors=None, truncate=False):
    shutil.copytree(source, target)
    if edit_config:
        path = target / peft_format.CONFIG_FILE
        path.write_text(json.dumps(edit_config(json.loads(path.read_text()))))
    path = target / peft_format.WEIGHTS_FILE
    if edit_tensors:
        safetensors.numpy.save_file(edit_tensors(safetensors.numpy.load_file(path)), path)
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return target


def _renamed(tensors):
    return {key.replace("q_proj", "q_projection"): value for key, value in tensors.items()}


def _one_dropped(tensors):
    return dict(list(tensors.items())[1:])


BAD_ADAPTERS = {
    "truncated": ({"truncate": True}, "not a readable safetensors file"),
    "wrong rank": (
        {"edit_config": lambda c: {**c, "r": 8}},
        r"shape \(4, 96\), expected \(8, 96\) \(rank 8\)",
    ),
    "not LoRA": (
        {"edit_config": lambda c: {**c, "peft_type": "PROMPT_TUNING"}},
        "reads LORA and IA3 adapters",
    ),
    "rslora": ({"edit_config": lambda c: {**c, "use_rslora": True}}, "use_rslora=True"),
    "unknown module": ({"edit_tensors": _renamed}, "not a LoRA tensor of this model"),
    "missing tensor": ({"edit_tensors": _one_dropped}, "expected"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_peft_adapters_are_clear_errors(saved_lora, tmp_path, case):
    root, loaded = saved_lora
    edits, message = BAD_ADAPTERS[case]
    broken = _broken_copy(root / "adapter", tmp_path / "broken", **edits)
    with pytest.raises(peft_format.AdapterFormatError, match=message):
        peft_format.load_peft(broken, loaded.config)


def test_adapter_for_another_model_and_missing_files_are_clear_errors(saved_lora, tmp_path):
    root, loaded = saved_lora
    other = tiny.save_tiny_checkpoint(tmp_path / "other", "llama_mha_tied", seed=0)
    del other
    wider = load_model(str(tmp_path / "other"), dtype=jnp.float32, progress=False)
    with pytest.raises(peft_format.AdapterFormatError, match="expected"):
        peft_format.load_peft(root / "adapter", wider.config)  # 4 kv heads: v_proj is wider
    with pytest.raises(peft_format.AdapterFormatError, match=r"needs adapter_config\.json"):
        peft_format.load_peft(tmp_path, loaded.config)


def test_writing_refuses_a_full_directory_and_what_peft_cannot_hold(saved_lora, tmp_path):
    root, loaded = saved_lora
    adapter = peft_format.load_peft(root / "adapter", loaded.config)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(files.DestinationError, match="not empty"):
        peft_format.save_peft(tmp_path / "full", adapter, loaded.config, alpha=8)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(peft_format.AdapterFormatError, match="not alpha / r"):
        peft_format.save_peft(tmp_path / "new", adapter, loaded.config, alpha=3)
    assert not (tmp_path / "new").exists()

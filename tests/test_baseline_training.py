"""Training the paper's baselines (LoRA / IA3 / DoRA) against HF PEFT on tiny random models: the
next-token loss and its gradient w.r.t. every adapter tensor against PEFT's autograd, LoRA and DoRA
dropout against PEFT's train-mode forward with the same masks, PEFT's initialization (the base
model) and merging into either weight layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from test_adapters import adapters_from_peft, peft_logits, peft_model, t2jax_logits

from t2jax import model as model_lib
from t2jax.adapters import core as adapters
from t2jax.adapters import weights as adapter_weights
from t2jax.loading import load_model
from t2jax.rl import loss as rl_loss

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.torch
DROPOUT = 0.3


def _stacked(adapter: adapters.ModelAdapters) -> adapters.ModelAdapters:
    return adapters.ModelAdapters(model_lib.stack_layers(adapter.layers))


def _batch(completion: int = 4) -> rl_loss.PolicyBatch:
    """Three left-padded rows whose last `completion` tokens are scored."""
    tokens, mask = tiny.random_padded_batch(seed=5, rows=3, length=10, pads=(0, 2, 4))
    scored = np.zeros_like(mask)
    scored[:, -completion:] = True
    return rl_loss.PolicyBatch(
        tokens=jnp.asarray(tokens, jnp.int32),
        token_mask=jnp.asarray(mask),
        completion_mask=jnp.asarray(scored),
        advantages=jnp.zeros(3, jnp.float32),
        row_mask=jnp.ones(3, bool),
    )


def _torch_loss(model, batch: rl_loss.PolicyBatch):
    mask = np.asarray(batch.token_mask)
    labels = np.where(np.asarray(batch.completion_mask), np.asarray(batch.tokens), -100)
    return model(
        input_ids=torch.tensor(np.asarray(batch.tokens), dtype=torch.long),
        attention_mask=torch.tensor(mask.astype(np.int64)),
        position_ids=torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0)),
        labels=torch.tensor(labels, dtype=torch.long),
    ).loss


def _peft_gradients(model, method: str) -> dict[tuple[int, str], dict[str, np.ndarray]]:
    """PEFT's gradients in t2jax's orientation, by (layer, module key) and adapter field."""
    found = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1])
        key = ".".join(parts[parts.index("layers") + 2 : parts.index("layers") + 4])
        grad = param.grad.numpy()
        if "lora_A" in name:
            found.setdefault((layer, key), {})["a"] = grad.T  # [in, r]
        elif "lora_B" in name:
            found.setdefault((layer, key), {})["b"] = grad.T  # [r, out]
        elif "lora_magnitude_vector" in name:
            found.setdefault((layer, key), {})["magnitude"] = grad
        elif "ia3_l" in name:
            found.setdefault((layer, key), {})["vector"] = grad.reshape(-1)
    return found


@pytest.mark.parametrize("method", ["lora", "ia3", "dora"])
def test_next_token_loss_and_adapter_gradients_match_peft_autograd(tmp_path, method):
    model = peft_model(tmp_path / "model", "qwen2_untied", method, seed=1)
    loaded = load_model(str(tmp_path / "model"), dtype=jnp.float32, stacked=False, progress=False)
    params = _stacked(adapters_from_peft(model, method))
    batch = _batch()
    options = rl_loss.LossOptions(objective="next_token", method=method, logprob_chunk=5)
    grads, metrics = rl_loss.compute_gradients(
        loaded.config, options, params, loaded.weights, None, batch, 1
    )
    model.zero_grad()
    reference = _torch_loss(model, batch)
    reference.backward()
    assert float(metrics["loss"]) == pytest.approx(reference.item(), abs=1e-5)
    expected = _peft_gradients(model, method)
    assert len(expected) == loaded.config.num_layers * len(grads.layers.targets)
    largest = 0.0
    for (layer, key), fields in expected.items():
        for field, want in fields.items():
            got = np.asarray(getattr(grads.layers.targets[key], field)[layer])
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6, err_msg=f"{key}.{field}")
            largest = max(largest, float(np.abs(want).max()))
    assert largest > 1e-3, "every gradient is zero"


class _FixedDropout(torch.nn.Module):
    """PEFT's dropout module replaced by a given inverted-dropout mask."""

    def __init__(self, mask: np.ndarray, rate: float):
        super().__init__()
        self.scale = torch.tensor(mask.astype(np.float32) / (1.0 - rate))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_matches_peft_train_mode_with_the_same_masks(tmp_path, method):
    model = peft_model(tmp_path / "model", "llama", method, seed=2)
    loaded = load_model(str(tmp_path / "model"), dtype=jnp.float32, stacked=False, progress=False)
    params = _stacked(adapters_from_peft(model, method))
    dropped = adapters.with_dropout(params, DROPOUT, jax.random.key(7))
    batch = _batch()
    tokens, mask = batch.tokens, batch.token_mask
    for layer_index, layer in enumerate(model.base_model.model.model.layers):
        for key, target in dropped.layers.targets.items():
            key_data = target.dropout_key[layer_index]
            in_features = target.a.shape[1]
            keep = jax.random.bernoulli(
                jax.random.wrap_key_data(key_data), 1.0 - DROPOUT, (*tokens.shape, in_features)
            )
            module = layer.get_submodule(key)
            module.lora_dropout["default"] = _FixedDropout(np.asarray(keep), DROPOUT)
    model.train()
    theirs = peft_logits(model, tokens, mask)
    ours = t2jax_logits(loaded, loaded.weights, dropped, tokens, mask)
    plain = t2jax_logits(loaded, loaded.weights, params, tokens, mask)
    rows = np.asarray(mask)
    assert np.abs(ours - theirs)[rows].max() <= 1e-4
    assert np.abs(plain - theirs)[rows].max() > 1e-2, "dropout changed nothing"


@pytest.mark.parametrize("method", ["lora", "ia3", "dora"])
@pytest.mark.parametrize("stacked", [False, True])
def test_fresh_adapters_are_the_base_model_and_merge_into_either_layout(tmp_path, method, stacked):
    tiny.save_tiny_checkpoint(tmp_path / "model", "qwen2_untied", seed=0)
    loaded = load_model(str(tmp_path / "model"), dtype=jnp.float32, stacked=stacked, progress=False)
    targets = ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    fresh = adapter_weights.init_adapters(
        jax.random.key(0), loaded.weights, method, targets, rank=4, alpha=8
    )
    tokens, mask = tiny.random_padded_batch(seed=3, rows=2, length=9, pads=(0, 3))
    tokens, mask, rows = jnp.asarray(tokens), jnp.asarray(mask), np.asarray(mask)
    base = t2jax_logits(loaded, loaded.weights, None, tokens, mask)
    np.testing.assert_allclose(
        t2jax_logits(loaded, loaded.weights, fresh, tokens, mask)[rows], base[rows], atol=1e-5
    )
    trained = jax.tree.map(
        lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape), fresh
    )  # every leaf moved
    adapted = t2jax_logits(loaded, loaded.weights, trained, tokens, mask)
    merged_weights = adapter_weights.merge_into_weights(loaded.weights, trained)
    merged = t2jax_logits(loaded, merged_weights, None, tokens, mask)
    assert np.abs(adapted - base)[rows].max() > 1e-2
    np.testing.assert_allclose(merged[rows], adapted[rows], atol=1e-4)

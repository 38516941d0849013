"""Decoder numerics against transformers' PyTorch models (fp32, tiny random configs)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from t2jax import loading, parallel
from t2jax import model as model_lib
from t2jax.checkpoints import load_checkpoint
from t2jax.config import MeshConfig

torch = pytest.importorskip("torch")

TOLERANCE = 1e-4
PADS = (0, 5, 17)  # left pads per row


def _t2jax_logits(config, weights, tokens, mask):
    positions = model_lib.positions_from_mask(jnp.asarray(mask))
    hidden, _ = jax.jit(model_lib.forward, static_argnums=0)(
        config, weights, jnp.asarray(tokens), positions, jnp.asarray(mask)
    )
    return np.asarray(model_lib.logits(weights, hidden))


def _torch_logits(torch_model, tokens, mask):
    with torch.no_grad():
        out = torch_model(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64))
        )
    return out.logits.numpy()


@pytest.mark.parametrize("stacked", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("kind", sorted(tiny.TINY_MODELS))
def test_logits_match_transformers(tmp_path, kind, stacked):
    torch_model = tiny.save_tiny_checkpoint(tmp_path, kind)
    checkpoint = load_checkpoint(str(tmp_path), progress=False)
    weights = loading.weights_from_hf(checkpoint.config, checkpoint.tensors, stacked=stacked)
    tokens, mask = tiny.random_padded_batch(seed=1, rows=3, length=40, pads=PADS)

    ours = _t2jax_logits(checkpoint.config, weights, tokens, mask)
    reference = _torch_logits(torch_model, tokens, mask)

    assert np.abs(ours - reference)[mask].max() <= TOLERANCE


def test_llama3_rope_scaling_changes_logits(tmp_path):
    """Guards the parity test above: without its rope scaling the llama3 model must disagree."""
    tiny.save_tiny_checkpoint(tmp_path, "llama3_rope")
    checkpoint = load_checkpoint(str(tmp_path), progress=False)
    weights = loading.weights_from_hf(checkpoint.config, checkpoint.tensors)
    unscaled = dataclasses.replace(checkpoint.config, rope_scaling=None)
    tokens, mask = tiny.random_padded_batch(seed=1, rows=3, length=40, pads=PADS)

    difference = _t2jax_logits(checkpoint.config, weights, tokens, mask) - _t2jax_logits(
        unscaled, weights, tokens, mask
    )

    assert np.abs(difference)[mask].max() > 10 * TOLERANCE


def test_stacked_and_unstacked_layouts_convert_both_ways(tmp_path):
    tiny.save_tiny_checkpoint(tmp_path, "qwen2_untied")
    checkpoint = load_checkpoint(str(tmp_path), progress=False)
    stacked = loading.weights_from_hf(checkpoint.config, checkpoint.tensors, stacked=True)
    unstacked = model_lib.unstack_layers(stacked.layers)

    assert len(unstacked) == checkpoint.config.num_layers
    restacked = model_lib.stack_layers(unstacked)
    for key, value in stacked.layers.items():
        np.testing.assert_array_equal(restacked[key], value)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1), (1, 2, 4)])
def test_forward_on_8_device_mesh_equals_single_device(tmp_path, mesh_shape):
    assert jax.device_count() == 8
    tiny.save_tiny_checkpoint(tmp_path, "llama")
    checkpoint = load_checkpoint(str(tmp_path), progress=False)
    config = checkpoint.config
    tokens, mask = tiny.random_padded_batch(seed=2, rows=8, length=24, pads=(0, 3) * 4)
    single = _t2jax_logits(
        config, loading.weights_from_hf(config, checkpoint.tensors, stacked=True), tokens, mask
    )

    mesh = parallel.make_mesh(MeshConfig(shape=mesh_shape))

    def place(key, array):
        return jax.device_put(array, parallel.weight_sharding(key, array.shape, mesh))

    sharded_weights = loading.weights_from_hf(config, checkpoint.tensors, stacked=True, place=place)
    assert any(
        not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded_weights)
    ), "nothing was sharded: the test would not exercise the mesh"
    batch = parallel.batch_sharding(mesh)
    sharded = _t2jax_logits(
        config, sharded_weights, jax.device_put(tokens, batch), jax.device_put(mask, batch)
    )

    np.testing.assert_allclose(sharded, single, atol=1e-5)

"""Fused q|k|v and gate|up projections (`model.fuse_projections`): the same logits as separate
kernels with biases, SVF experts, LoRA / IA3 / DoRA adapters and dropped kernels, in both layer
layouts and on sharded weights, and the same greedy tokens from the sampler."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import svf_tiny
import tiny

from t2jax import loading, parallel
from t2jax import model as model_lib
from t2jax.adapters import weights as adapter_weights
from t2jax.config import MeshConfig, SamplerConfig
from t2jax.sampler import Sampler
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets

CONFIG = dataclasses.replace(svf_tiny.CONFIG, qkv_bias=True)  # Qwen2-style q/k/v biases
QKV, GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"
SEPARATE = (*model_lib.ATTN_KERNELS[:3], *model_lib.QKV_BIASES, *model_lib.MLP_KERNELS[:2])


def _model(stacked, seed=4):
    tensors = svf_tiny.random_tensors(CONFIG, seed)
    weights = loading.weights_from_hf(CONFIG, tensors, stacked=stacked)
    return tensors, weights


def _first_layer(weights):
    return model_lib.layer_slice(weights.layers, 0)


def _batch():
    tokens, mask = tiny.random_padded_batch(seed=7, rows=3, length=9, pads=(0, 2, 5))
    return jnp.asarray(tokens % CONFIG.vocab_size), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnames=("config",))
def _logits(config, weights, tokens, mask, svf=None):
    positions = model_lib.positions_from_mask(mask)
    hidden, _ = model_lib.forward(config, weights, tokens, positions, mask, svf=svf)
    return model_lib.logits(weights, hidden)  # [B, T, V]


def _assert_same_logits(weights, fused, svf=None, atol=1e-5):
    tokens, mask = _batch()
    separate = _logits(CONFIG, weights, tokens, mask, svf)
    together = _logits(CONFIG, fused, tokens, mask, svf)
    np.testing.assert_allclose(together, separate, atol=atol)


def _per_row_svf(tensors, targets, stacked):
    fingerprint = svf_cache.fingerprint(CONFIG, tensors)
    factors = svf_tiny.factors(tensors, fingerprint, targets, stacked=stacked)
    shapes = svf_targets.svf_param_shapes(CONFIG, targets)
    experts = [
        svf_lib.z_of(
            svf_lib.init_params(jax.random.key(row), shapes, std=0.5),
            svf_lib.OFFICIAL_PARAMETRIZATION,
        )
        for row in range(3)
    ]
    return svf_factors.svf_from_factors(factors, svf_lib.per_row_experts(experts), "factored")


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "unstacked"])
def test_fused_weights_give_the_same_logits_with_biases(stacked):
    _, weights = _model(stacked)
    fused = model_lib.fuse_projections(weights)
    layer = _first_layer(fused)
    assert {QKV, f"{QKV}.bias", GATE_UP} <= set(layer) and not set(SEPARATE) & set(layer)
    assert layer[QKV].shape == (CONFIG.hidden_size, CONFIG.q_dim + 2 * CONFIG.kv_dim)
    _assert_same_logits(weights, fused)

    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), weights)
    assert {x.dtype for x in jax.tree.leaves(model_lib.fuse_projections(bf16))} == {
        jnp.dtype(jnp.bfloat16)
    }


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "unstacked"])
@pytest.mark.parametrize("targets", ["qv,mlp", "self_attn.k_proj,mlp.up_proj"])
def test_svf_per_row_experts_on_fused_groups(stacked, targets):
    """Fully adapted groups, mixed ones (adapted members on SVF factors, the others on column
    slices of the fused kernel and bias) and unadapted ones (one matmul) all match."""
    tensors, weights = _model(stacked)
    svf = _per_row_svf(tensors, svf_targets.resolve_targets(targets), stacked)
    _assert_same_logits(weights, model_lib.fuse_projections(weights), svf, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "ia3", "dora"])
def test_adapters_on_q_and_v_use_slices_of_the_fused_kernel(kind):
    _, weights = _model(stacked=False)
    adapter = adapter_weights.init_adapters(
        jax.random.key(1), weights, kind, ("self_attn.q_proj", "self_attn.v_proj")
    )
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    adapter = jax.tree.unflatten(treedef, leaves)  # away from the identity initialization
    _assert_same_logits(weights, model_lib.fuse_projections(weights), adapter, atol=1e-4)


def test_a_group_with_a_dropped_kernel_stays_unfused():
    tensors, weights = _model(stacked=False)
    targets = ("self_attn.q_proj", "mlp.up_proj")
    dropped = svf_factors.drop_target_kernels(weights, targets[:1])  # up_proj keeps its kernel
    fused = model_lib.fuse_projections(dropped)
    layer = _first_layer(fused)
    assert QKV not in layer and "self_attn.k_proj" in layer and f"{QKV}.bias" not in layer
    assert GATE_UP in layer and "mlp.up_proj" not in layer
    svf = _per_row_svf(tensors, targets, stacked=False)
    _assert_same_logits(dropped, fused, svf, atol=1e-4)


def test_tensor_parallel_weights_stay_unfused_and_fsdp_weights_fuse():
    """Columns split over "tensor" would not line up with the fused kernel's shards; weights
    split only over their input axis (FSDP) fuse, and keep working."""

    def placed(mesh_shape):
        mesh = parallel.make_mesh(MeshConfig(shape=mesh_shape))

        def place(key, x):
            return jax.device_put(x, parallel.weight_sharding(key, x.shape, mesh))

        tensors = svf_tiny.random_tensors(CONFIG, 4)
        return loading.weights_from_hf(CONFIG, tensors, stacked=True, place=place)

    tensor_parallel = placed((2, 2, 2))
    assert model_lib.fuse_projections(tensor_parallel) is tensor_parallel
    fsdp = placed((1, 8, 1))
    fused = model_lib.fuse_projections(fsdp)
    assert GATE_UP in fused.layers
    _assert_same_logits(fsdp, fused)


def test_sampler_greedy_tokens_with_and_without_fusion():
    tensors, weights = _model(stacked=False)
    prompts = [[5, 9, 13, 2, 8, 1], [5, 9, 13, 2, 7], [30, 31, 32, 33]]

    def generate(fuse, **kwargs):
        settings = SamplerConfig(fuse_projections=fuse, min_shared_prefix=3)
        sampler = Sampler(CONFIG, weights, tiny.tiny_tokenizer(), (CONFIG.vocab_size,), settings)
        assert (GATE_UP in _first_layer(sampler.weights)) == fuse
        return sampler.generate(prompts, max_new_tokens=8, **kwargs).token_ids

    assert generate(True) == generate(False)  # the first two prompts prefill a shared prefix
    svf = _per_row_svf(tensors, svf_targets.resolve_targets("qv"), stacked=False)
    assert generate(True, svf=svf) == generate(False, svf=svf)

"""SVD factors: reconstruction, torch orientation, mesh equality, cache, fingerprints, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import svf_tiny

from t2jax import loading, parallel
from t2jax import model as model_lib
from t2jax.config import MeshConfig, ModelConfig
from t2jax.loading import load_model
from t2jax.svf import cache as svf_cache
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets

ALL_TARGETS = svf_targets.TARGET_SETS["all"]


@pytest.fixture(scope="module")
def tiny():
    tensors, _, fingerprint = svf_tiny.model(seed=0)
    return tensors, fingerprint, svf_tiny.factors(tensors, fingerprint, ALL_TARGETS)


def _uniform_z(factors, value):
    shapes = svf_targets.svf_param_shapes(svf_tiny.CONFIG, factors.targets)
    return {key: jnp.full(shape, value) for key, shape in shapes.items()}


def test_resolve_targets():
    assert svf_targets.resolve_targets("mlp") == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert svf_targets.resolve_targets("qv") == ("self_attn.q_proj", "self_attn.v_proj")
    assert len(svf_targets.resolve_targets("all")) == 7
    assert svf_targets.resolve_targets("mlp.down_proj,self_attn.q_proj") == (
        "self_attn.q_proj",
        "mlp.down_proj",
    )
    with pytest.raises(svf_targets.SVDError, match="unknown SVF targets"):
        svf_targets.resolve_targets("mlp.gate")


def test_hf_tensor_names_round_trip():
    name = svf_targets.hf_tensor_name(7, "mlp.up_proj")
    assert name == "model.layers.7.mlp.up_proj.weight"
    assert svf_targets.parse_hf_tensor_name(name) == (7, "mlp.up_proj")
    with pytest.raises(svf_targets.SVDError):
        svf_targets.parse_hf_tensor_name("model.layers.7.input_layernorm.weight")


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "unstacked"])
def test_uniform_z_reproduces_dropped_kernels(tiny, stacked):
    tensors, fingerprint, _ = tiny
    factors = svf_tiny.factors(tensors, fingerprint, ALL_TARGETS, stacked=stacked)
    weights = loading.weights_from_hf(svf_tiny.CONFIG, tensors, stacked=stacked)
    dropped = svf_factors.drop_target_kernels(weights, ALL_TARGETS)
    assert "mlp.up_proj" not in model_lib.layer_slice(dropped.layers, 0)

    merged = svf_factors.merge_into_weights(dropped, factors, _uniform_z(factors, 0.37))

    for layer in range(svf_tiny.CONFIG.num_layers):
        for key in ALL_TARGETS:
            expected = tensors[svf_targets.hf_tensor_name(layer, key)].T  # [in, out]
            found = model_lib.layer_slice(merged.layers, layer)[key]
            np.testing.assert_allclose(found, expected, atol=2e-6, rtol=1e-5)


def test_nonuniform_z_changes_kernels(tiny):
    """Guards the test above: a non-uniform z must not reproduce W."""
    tensors, _, factors = tiny
    weights = loading.weights_from_hf(svf_tiny.CONFIG, tensors, stacked=False)
    z = _uniform_z(factors, 1.0)
    z["mlp.up_proj"] = z["mlp.up_proj"].at[:, 0].set(2.0)
    merged = svf_factors.merge_into_weights(weights, factors, z)
    change = merged.layers[0]["mlp.up_proj"] - weights.layers[0]["mlp.up_proj"]
    assert float(jnp.abs(change).max()) > 1e-2
    assert (
        float(jnp.abs(merged.layers[0]["mlp.gate_proj"] - weights.layers[0]["mlp.gate_proj"]).max())
        < 1e-5
    )


def test_factors_are_descending_and_orthonormal(tiny):
    _, _, factors = tiny
    for key, factor in factors.layers[1].items():
        assert np.all(np.diff(np.asarray(factor.s)) <= 0), key
        a, b = np.asarray(factor.a), np.asarray(factor.b)
        np.testing.assert_allclose(a.T @ a, np.eye(a.shape[1]), atol=1e-5)
        np.testing.assert_allclose(b @ b.T, np.eye(b.shape[0]), atol=1e-5)


@pytest.mark.torch
def test_orientation_matches_torch_svd_of_hf_weight(tiny):
    torch = pytest.importorskip("torch")
    tensors, _, factors = tiny
    for key in ALL_TARGETS:
        hf_weight = torch.tensor(tensors[svf_targets.hf_tensor_name(1, key)])  # [out, in]
        u, s, vh = torch.linalg.svd(hf_weight, full_matrices=False)
        factor = factors.layers[1][key]
        np.testing.assert_allclose(factor.s, s.numpy(), rtol=1e-5, atol=1e-6)
        # A = V and B = U^T up to the sign of each singular pair.
        np.testing.assert_allclose(np.abs(factor.a), np.abs(vh.numpy().T), atol=1e-4)
        np.testing.assert_allclose(np.abs(factor.b), np.abs(u.numpy().T), atol=1e-4)


def test_decomposition_on_8_device_mesh_equals_single_device(tiny):
    tensors, fingerprint, single = tiny
    mesh = parallel.make_mesh(MeshConfig(shape=(2, 2, 2)))
    assert mesh.devices.size == 8

    def place(key, array):
        return jax.device_put(array, parallel.weight_sharding(key, array.shape, mesh))

    sharded = loading.weights_from_hf(svf_tiny.CONFIG, tensors, stacked=True, place=place)
    assert not sharded.layers["mlp.up_proj"].sharding.is_fully_replicated
    on_mesh = svf_factors.decompose(
        svf_tiny.CONFIG,
        svf_factors.kernels_from_weights(sharded),
        ALL_TARGETS,
        fingerprint=fingerprint,
        placement=svf_factors.Placement(stacked=True, mesh=mesh),
        progress=False,
    )

    assert on_mesh.layers["mlp.up_proj"].a.sharding.mesh == mesh
    assert not on_mesh.layers["mlp.up_proj"].b.sharding.is_fully_replicated
    merged = svf_factors.merge_into_weights(sharded, on_mesh, _uniform_z(on_mesh, 1.0))
    for key in ALL_TARGETS:
        assert merged.layers[key].sharding == sharded.layers[key].sharding, key
        np.testing.assert_allclose(merged.layers[key], sharded.layers[key], atol=2e-6)
    for layer in range(svf_tiny.CONFIG.num_layers):
        for key in ALL_TARGETS:
            expected = single.layers[layer][key]
            found = jax.tree.map(lambda x, layer=layer: np.asarray(x[layer]), on_mesh.layers[key])
            for part in ("a", "s", "b"):
                np.testing.assert_allclose(
                    getattr(found, part), getattr(expected, part), atol=1e-5, err_msg=key
                )


def test_cache_round_trip_resume_and_fingerprint_check(tiny, tmp_path):
    tensors, fingerprint, in_memory = tiny
    reads = []

    def counting_source(layer, key):
        reads.append((layer, key))
        return svf_factors.kernels_from_tensors(tensors)(layer, key)

    svf_cache.decompose_to_cache(
        svf_tiny.CONFIG, counting_source, "mlp", tmp_path, fingerprint=fingerprint, progress=False
    )
    assert len(reads) == 3 * svf_tiny.CONFIG.num_layers
    assert (tmp_path / "model.layers.1.mlp.down_proj.weight").is_dir()

    loaded = svf_cache.load_factors(
        tmp_path,
        svf_tiny.CONFIG,
        "mlp",
        fingerprint=fingerprint,
        placement=svf_factors.Placement(stacked=False),
    )
    expected = in_memory.select(svf_targets.TARGET_SETS["mlp"])
    jax.tree.map(np.testing.assert_array_equal, loaded.layers, expected.layers)

    in_bf16 = svf_cache.load_factors(
        tmp_path,
        svf_tiny.CONFIG,
        "mlp",
        fingerprint=fingerprint,
        placement=svf_factors.Placement(stacked=False, dtype=jnp.bfloat16),
    )
    assert jax.tree.map(
        lambda x: x.dtype.name, in_bf16.layers[0]["mlp.up_proj"]
    ) == svf_factors.Factor(a="bfloat16", s="float32", b="bfloat16")

    reads.clear()  # an interrupted run resumes: only missing kernels are decomposed
    svf_cache.decompose_to_cache(
        svf_tiny.CONFIG, counting_source, "all", tmp_path, fingerprint=fingerprint, progress=False
    )
    assert len(reads) == 4 * svf_tiny.CONFIG.num_layers

    with pytest.raises(svf_cache.FingerprintError, match="another model"):
        svf_cache.load_factors(tmp_path, svf_tiny.CONFIG, "mlp", fingerprint="0123456789abcdef")
    with pytest.raises(svf_cache.FingerprintError):
        svf_cache.decompose_to_cache(
            svf_tiny.CONFIG, counting_source, "mlp", tmp_path, fingerprint="0" * 16
        )
    with pytest.raises(svf_targets.SVDError, match="no SVD factors"):
        svf_cache.load_factors(tmp_path / "empty", svf_tiny.CONFIG, "mlp", fingerprint=fingerprint)


def test_fingerprint_identifies_the_model_not_its_dtype(tiny):
    tensors, fingerprint, _ = tiny
    for dtype, stacked in ((jnp.float32, True), (jnp.bfloat16, False)):
        weights = loading.weights_from_hf(svf_tiny.CONFIG, tensors, dtype=dtype, stacked=stacked)
        as_tensors = svf_cache.weights_as_tensors(svf_tiny.CONFIG, weights)
        assert svf_cache.fingerprint(svf_tiny.CONFIG, as_tensors) == fingerprint
    other = svf_tiny.random_tensors(seed=1)
    assert svf_cache.fingerprint(svf_tiny.CONFIG, other) != fingerprint


def test_exact_parameter_counts_for_llama3_8b_from_shapes_only():
    config = ModelConfig.from_hf(svf_tiny.LLAMA3_8B)
    assert svf_targets.svf_param_count(config, svf_targets.resolve_targets("mlp")) == 393_216
    assert svf_targets.svf_param_count(config, svf_targets.resolve_targets("qv")) == 163_840
    assert (
        svf_targets.adapter_param_count(config, "lora", svf_targets.resolve_targets("qv"), 16)
        == 6_815_744
    )
    assert (
        svf_targets.adapter_param_count(config, "lora", svf_targets.resolve_targets("qv,mlp"), 16)
        == 35_127_296
    )


def test_param_shapes_match_factor_ranks(tiny):
    _, _, factors = tiny
    shapes = svf_targets.svf_param_shapes(svf_tiny.CONFIG, factors.targets)
    assert {key: rank for key, (_, rank) in shapes.items()} == factors.ranks()
    assert shapes["self_attn.v_proj"] == (2, 16)


def test_loaded_model_factors_are_cached_and_placed_like_the_weights(tmp_path):
    mlp = svf_targets.TARGET_SETS["mlp"]
    svf_tiny.save_hf_dir(tmp_path / "model")
    loaded = load_model(
        str(tmp_path / "model"),
        dtype=jnp.bfloat16,
        stacked=True,
        mesh_config=MeshConfig(shape=(2, 2, 2)),
        skip=lambda key: key in mlp,
        progress=False,
    )
    placement = svf_factors.Placement.for_weights(loaded.weights, loaded.mesh)
    assert (placement.stacked, placement.dtype, placement.mesh) == (True, jnp.bfloat16, loaded.mesh)

    root = tmp_path / "svd"
    factors = svf_cache.loaded_model_factors(loaded, mlp, cache_root=root, progress=False)
    fingerprint = svf_cache.fingerprint(loaded.config, loaded.checkpoint.tensors)
    assert factors.fingerprint == fingerprint
    assert (root / fingerprint / "meta.json").is_file()
    assert factors.targets == mlp and factors.num_layers == svf_tiny.CONFIG.num_layers
    up = factors.layers["mlp.up_proj"]
    assert (up.a.dtype, up.s.dtype, up.b.dtype) == (jnp.bfloat16, jnp.float32, jnp.bfloat16)
    assert up.b.sharding.mesh == loaded.mesh and not up.b.sharding.is_fully_replicated

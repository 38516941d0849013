"""SVF composition through the decoder and the sampler: invariances, merged == factored, per-row
experts, gradients, the official initialization, and mixing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import svf_tiny
import tiny

from t2jax import model as model_lib
from t2jax.sampler import Sampler
from t2jax.svf import core as svf_lib
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets

CONFIG = svf_tiny.CONFIG
TARGETS = svf_targets.resolve_targets("qv,mlp")
ROWS = 3


def _tiny_model(stacked):
    tensors, weights, fingerprint = svf_tiny.model(seed=2, stacked=stacked)
    return weights, svf_tiny.factors(tensors, fingerprint, TARGETS, stacked=stacked)


@pytest.fixture(scope="module", params=[True, False], ids=["stacked", "unstacked"])
def tiny_model(request):
    return _tiny_model(request.param)


@pytest.fixture(scope="module")
def unstacked_model():
    """The CPU default layout, for the slowest tests (the others cover both layouts)."""
    return _tiny_model(stacked=False)


def _random_z(seed, spread=0.5):
    """Scales far from uniform, so every expert visibly changes the model."""
    shapes = svf_targets.svf_param_shapes(CONFIG, TARGETS)
    params = svf_lib.init_params(jax.random.key(seed), shapes, std=spread)
    return svf_lib.z_of(params, svf_lib.OFFICIAL_PARAMETRIZATION)


def _batch(rows=ROWS):
    tokens, mask = tiny.random_padded_batch(seed=5, rows=rows, length=9, pads=(0, 3, 6)[:rows])
    tokens = jnp.asarray(tokens % CONFIG.vocab_size)
    return tokens, jnp.asarray(mask)


@functools.partial(jax.jit, static_argnames=("config",))
def _logits(config, weights, tokens, mask, svf=None):
    positions = model_lib.positions_from_mask(mask)
    hidden, _ = model_lib.forward(config, weights, tokens, positions, mask, svf=svf)
    return model_lib.logits(weights, hidden)  # [B, T, V]


def _adapted_logits(tiny_model, z, mode, rows=ROWS):
    weights, factors = tiny_model
    tokens, mask = _batch(rows)
    return _logits(CONFIG, weights, tokens, mask, svf_factors.svf_from_factors(factors, z, mode))


@pytest.mark.parametrize("mode", ["merged", "factored"])
def test_uniform_z_is_the_base_model_and_rescaling_z_is_a_no_op(tiny_model, mode):
    weights, _ = tiny_model
    tokens, mask = _batch()
    base = _logits(CONFIG, weights, tokens, mask)
    uniform = {key: 0.3 * jnp.ones_like(z) for key, z in _random_z(0).items()}
    np.testing.assert_allclose(_adapted_logits(tiny_model, uniform, mode), base, atol=1e-4)

    z = _random_z(1)
    rescaled = {key: 7.5 * v for key, v in z.items()}
    adapted = _adapted_logits(tiny_model, z, mode)
    np.testing.assert_allclose(_adapted_logits(tiny_model, rescaled, mode), adapted, atol=1e-4)
    assert float(jnp.abs(adapted - base).max()) > 1e-2  # the expert does change the model


def test_merged_equals_factored_and_auto_on_logits(tiny_model):
    z = _random_z(3)
    merged = _adapted_logits(tiny_model, z, "merged")
    factored = _adapted_logits(tiny_model, z, "factored")
    np.testing.assert_allclose(factored, merged, atol=1e-4)
    np.testing.assert_allclose(_adapted_logits(tiny_model, z, "auto"), merged, atol=1e-4)


def test_gradient_pass_mode_picks_the_cheaper_application():
    """Closed-form flop counts: Qwen2.5-0.5B's MLP kernels (896 <-> 4864, rank 896) are cheaper
    factored at any token count; its square q_proj (rank 896) only below about 3 x 896 tokens."""
    for tokens in (1, 512, 65536):
        assert svf_lib.gradient_pass_mode(tokens, 896, 896, 4864) == "factored"  # gate / up
        assert svf_lib.gradient_pass_mode(tokens, 4864, 896, 896) == "factored"  # down
    assert svf_lib.gradient_pass_mode(2048, 896, 896, 896) == "factored"
    assert svf_lib.gradient_pass_mode(4096, 896, 896, 896) == "merged"
    # merged = 3 N d^2 + 3 d^3 and factored = 4 N d^2 cross at N = 3 d
    assert svf_lib.gradient_pass_mode(3 * 896 - 1, 896, 896, 896) == "factored"
    assert svf_lib.gradient_pass_mode(3 * 896 + 1, 896, 896, 896) == "merged"


def test_merged_weights_equal_merged_svf(tiny_model):
    weights, factors = tiny_model
    tokens, mask = _batch()
    z = _random_z(4)
    dense = _logits(CONFIG, svf_factors.merge_into_weights(weights, factors, z), tokens, mask)
    np.testing.assert_allclose(dense, _adapted_logits(tiny_model, z, "merged"), atol=1e-4)


def test_per_row_experts_equal_each_row_alone(tiny_model):
    weights, factors = tiny_model
    tokens, mask = _batch()
    experts = [_random_z(10 + row) for row in range(ROWS)]
    svf = svf_factors.svf_from_factors(factors, svf_lib.per_row_experts(experts), "factored")
    together = _logits(CONFIG, weights, tokens, mask, svf)
    for row, z in enumerate(experts):
        alone_svf = svf_factors.svf_from_factors(factors, z, "merged")
        alone = _logits(CONFIG, weights, tokens[row : row + 1], mask[row : row + 1], alone_svf)
        real = np.asarray(mask[row])
        np.testing.assert_allclose(together[row][real], alone[0][real], atol=1e-4)
    assert float(jnp.abs(together[0] - together[1]).max()) > 1e-2


def test_per_row_experts_in_the_sampler_equal_single_expert_runs(unstacked_model):
    weights, factors = unstacked_model
    prompts = [[5, 9, 13, 2], [7, 7, 1], [30, 31, 32, 33, 34, 35]]
    experts = [_random_z(20 + row, spread=2.0) for row in range(len(prompts))]

    def sampler(weights):
        tokenizer = tiny.tiny_tokenizer()
        return Sampler(CONFIG, weights, tokenizer, eos_ids=(CONFIG.vocab_size,))

    svf = svf_factors.svf_from_factors(factors, svf_lib.per_row_experts(experts), "factored")
    together = sampler(weights).generate(prompts, max_new_tokens=8, svf=svf).token_ids
    alone = [
        sampler(svf_factors.merge_into_weights(weights, factors, z))
        .generate([prompt], max_new_tokens=8)
        .token_ids[0]
        for prompt, z in zip(prompts, experts, strict=True)
    ]
    assert together == alone
    assert len({tuple(ids) for ids in alone}) == len(prompts)  # the experts do differ


@pytest.mark.parametrize("mode", ["merged", "factored", "auto"])
def test_grad_wrt_p_matches_central_differences(unstacked_model, mode):
    weights, factors = unstacked_model
    tokens, mask = _batch()
    shapes = svf_targets.svf_param_shapes(CONFIG, TARGETS)
    p = svf_lib.init_params(jax.random.key(0), shapes, std=0.5)
    readout = jax.random.normal(jax.random.key(1), (ROWS, 9, CONFIG.vocab_size))

    def loss(p):
        z = svf_lib.z_of(p, svf_lib.OFFICIAL_PARAMETRIZATION)
        logits = _logits(
            CONFIG, weights, tokens, mask, svf_factors.svf_from_factors(factors, z, mode)
        )
        return jnp.mean(jnp.where(mask[..., None], logits * readout, 0.0))

    grad = jax.grad(loss)(p)
    for seed in range(2):
        direction = svf_lib.init_params(jax.random.key(100 + seed), shapes, std=1.0)
        direction = {key: d - 0.1 for key, d in direction.items()}  # N(0, 1)
        eps = 1e-2
        plus = loss({key: p[key] + eps * direction[key] for key in p})
        minus = loss({key: p[key] - eps * direction[key] for key in p})
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(jnp.vdot(grad[key], direction[key]) for key in p)
        assert abs(float(analytic)) > 1e-4
        np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2)


def test_official_initialization():
    params = svf_lib.init_params(jax.random.key(0), {"mlp.up_proj": (32, 4096)})
    p = np.asarray(params["mlp.up_proj"])
    assert abs(p.mean() - 0.1) < 1e-3 and abs(p.std() - 0.01) < 1e-3
    z = np.asarray(svf_lib.z_of(params, svf_lib.OFFICIAL_PARAMETRIZATION)["mlp.up_proj"])
    assert abs(z.mean() - 0.525) < 1e-3
    doubled = svf_lib.z_of(params, svf_lib.Parametrization("sigmoid", max_mult=2.0))
    np.testing.assert_allclose(doubled["mlp.up_proj"], 2 * z, rtol=1e-6)
    plain = svf_lib.Parametrization("plain")
    plain_params = svf_lib.init_params(jax.random.key(0), {"mlp.up_proj": (2, 8)}, plain)
    assert abs(float(plain_params["mlp.up_proj"].mean()) - 1.0) < 0.05
    assert svf_lib.z_of(plain_params, plain)["mlp.up_proj"] is not None
    np.testing.assert_array_equal(
        svf_lib.z_of(plain_params, plain)["mlp.up_proj"], plain_params["mlp.up_proj"]
    )
    with pytest.raises(svf_lib.SVFError):
        svf_lib.Parametrization("tanh")


def test_mixing_one_hot_per_matrix_normalized_and_jitted():
    experts = [_random_z(30 + k) for k in range(3)]
    stacked = svf_lib.stack_experts(experts)
    order = TARGETS
    mix = jax.jit(svf_lib.mix, static_argnames=("normalize", "order"))
    for k in range(3):
        one_hot = jnp.eye(3)[k]
        mixed = mix(stacked, one_hot, order=order)
        jax.tree.map(np.testing.assert_allclose, mixed, experts[k])

    unnormalized = mix(stacked, jnp.array([2.0, 2.0, 0.0]), order=order)
    normalized = mix(stacked, jnp.array([2.0, 2.0, 0.0]), normalize=True, order=order)
    for key in order:
        np.testing.assert_allclose(
            unnormalized[key], 2 * (experts[0][key] + experts[1][key]), rtol=1e-6
        )
        np.testing.assert_allclose(
            normalized[key], (experts[0][key] + experts[1][key]) / 2, rtol=1e-6
        )

    # Per matrix: layer-major, targets in `order`; pick expert 2 for layer 1's up_proj only.
    matrices = CONFIG.num_layers * len(order)
    alpha = np.zeros((3, matrices), np.float32)
    alpha[0] = 1.0
    chosen = 1 * len(order) + order.index("mlp.up_proj")
    alpha[:, chosen] = [0.0, 0.0, 1.0]
    mixed = mix(stacked, jnp.asarray(alpha), order=order)
    np.testing.assert_allclose(mixed["mlp.up_proj"][1], experts[2]["mlp.up_proj"][1])
    np.testing.assert_allclose(mixed["mlp.up_proj"][0], experts[0]["mlp.up_proj"][0])
    np.testing.assert_allclose(mixed["self_attn.q_proj"][1], experts[0]["self_attn.q_proj"][1])

    with pytest.raises(svf_lib.SVFError, match="must have shape"):
        svf_lib.mix(stacked, jnp.ones((3, matrices + 1)), order=order)
    with pytest.raises(svf_lib.SVFError, match="matrix order"):
        svf_lib.mix(stacked, jnp.ones((3, matrices)))
    with pytest.raises(svf_lib.SVFError, match="4 entries for 3 experts"):
        svf_lib.mix(stacked, jnp.ones(4))


def test_mismatched_z_is_a_clear_error(tiny_model):
    _, factors = tiny_model
    z = _random_z(0)
    with pytest.raises(svf_targets.SVDError, match="factors cover"):
        svf_factors.svf_from_factors(factors, {key: z[key] for key in TARGETS[:-1]})
    with pytest.raises(svf_targets.SVDError, match="expected"):
        svf_factors.svf_from_factors(factors, {**z, "mlp.up_proj": z["mlp.up_proj"][:, :5]})
    per_row = svf_lib.per_row_experts([z, z])
    with pytest.raises(svf_targets.SVDError, match="factored"):
        svf_factors.svf_from_factors(factors, per_row, "merged")


def test_padding_expert_rows_adds_base_model_rows(tiny_model):
    weights, factors = tiny_model
    experts = [_random_z(40 + row) for row in range(2)]
    svf = svf_factors.svf_from_factors(factors, svf_lib.per_row_experts(experts), "factored")
    padded = svf_lib.pad_expert_rows(svf, ROWS)
    tokens, mask = _batch()
    together = _logits(CONFIG, weights, tokens, mask, padded)
    np.testing.assert_allclose(
        together[:2], _logits(CONFIG, weights, tokens[:2], mask[:2], svf), atol=1e-4
    )
    np.testing.assert_allclose(together[2:], _logits(CONFIG, weights, tokens, mask)[2:], atol=1e-4)
    single = svf_factors.svf_from_factors(factors, experts[0], "factored")
    unchanged = svf_lib.pad_expert_rows(single, ROWS)
    leaves = zip(jax.tree.leaves(unchanged), jax.tree.leaves(single), strict=True)
    assert all(a is b for a, b in leaves)
    with pytest.raises(svf_lib.SVFError, match="cannot pad"):
        svf_lib.pad_expert_rows(padded, 2)

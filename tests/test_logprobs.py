"""Chunked log-probabilities and KL divergences against plain (full-softmax) and numpy versions, and
the teacher-forced scorer against a forward pass followed by the chunked log-probabilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import svf_tiny

from t2jax import logprobs
from t2jax import model as model_lib
from t2jax.svf import factors as svf_factors

BATCH, LENGTH, WIDTH, VOCAB = 3, 12, 8, 11


def _weights(tied: bool, seed: int = 0) -> model_lib.Weights:
    rng = np.random.default_rng(seed)
    embed = jnp.asarray(rng.standard_normal((VOCAB, WIDTH)), jnp.float32)
    lm_head = None if tied else jnp.asarray(rng.standard_normal((WIDTH, VOCAB)), jnp.float32)
    return model_lib.Weights(embed=embed, layers=(), final_norm=jnp.ones(WIDTH), lm_head=lm_head)


def _inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((BATCH, LENGTH, WIDTH)), jnp.float32)
    reference = hidden + 0.5 * jnp.asarray(rng.standard_normal(hidden.shape), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (BATCH, LENGTH)), jnp.int32)
    return hidden, reference, targets


def _plain_log_probs(weights, hidden, targets):
    """The unchunked reference: full [B, T, V] log-softmax, then gather."""
    log_probs = jax.nn.log_softmax(model_lib.logits(weights, hidden))  # [B, T, V]
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [1, 4, LENGTH])
def test_chunked_log_softmax_equals_plain(tied, chunk):
    weights = _weights(tied)
    hidden, _, targets = _inputs()

    chunked, kl = logprobs.token_log_probs(weights, hidden, targets, chunk)

    assert kl is None
    np.testing.assert_allclose(chunked, _plain_log_probs(weights, hidden, targets), atol=1e-5)


def test_gradients_through_the_rematerialized_chunks_equal_plain_ones():
    weights = _weights(tied=False)
    hidden, _, targets = _inputs()

    def chunked_sum(h):
        return jnp.sum(logprobs.token_log_probs(weights, h, targets, 4)[0])

    def plain_sum(h):
        return jnp.sum(_plain_log_probs(weights, h, targets))

    np.testing.assert_allclose(
        jax.grad(chunked_sum)(hidden), jax.grad(plain_sum)(hidden), atol=1e-5
    )


def _numpy_log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("direction", ["ref_policy", "policy_ref"])
def test_kl_matches_a_direct_numpy_computation(direction):
    weights = _weights(tied=False)
    hidden, reference, targets = _inputs()
    log_p = _numpy_log_softmax(np.asarray(hidden, np.float64) @ np.asarray(weights.lm_head))
    log_q = _numpy_log_softmax(np.asarray(reference, np.float64) @ np.asarray(weights.lm_head))
    if direction == "ref_policy":  # KL(pi_ref || pi): the official code's F.kl_div
        expected = (np.exp(log_q) * (log_q - log_p)).sum(-1)
    else:  # KL(pi || pi_ref): the paper's equation
        expected = (np.exp(log_p) * (log_p - log_q)).sum(-1)

    _, kl = logprobs.token_log_probs(weights, hidden, targets, 4, reference, direction)

    np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-5)
    assert np.all(expected > 0)  # the two models differ everywhere


def test_kl_directions_differ_and_vanish_for_identical_models():
    weights = _weights(tied=True)
    hidden, reference, targets = _inputs()

    _, forward_kl = logprobs.token_log_probs(weights, hidden, targets, 3, reference, "ref_policy")
    _, reverse_kl = logprobs.token_log_probs(weights, hidden, targets, 3, reference, "policy_ref")
    _, same = logprobs.token_log_probs(weights, hidden, targets, 3, hidden, "ref_policy")

    assert float(jnp.abs(forward_kl - reverse_kl).max()) > 1e-2
    np.testing.assert_allclose(same, 0.0, atol=1e-5)


def test_no_gradient_flows_into_the_reference():
    weights = _weights(tied=False)
    hidden, reference, targets = _inputs()

    def total_kl(ref):
        return jnp.sum(logprobs.token_log_probs(weights, hidden, targets, 4, ref)[1])

    np.testing.assert_array_equal(jax.grad(total_kl)(reference), 0.0)


def test_bad_chunk_and_direction_are_errors():
    weights = _weights(tied=True)
    hidden, reference, targets = _inputs()
    with pytest.raises(ValueError, match="not a multiple of the chunk size 5"):
        logprobs.token_log_probs(weights, hidden, targets, 5)
    with pytest.raises(ValueError, match="unknown KL direction"):
        logprobs.token_log_probs(weights, hidden, targets, 4, reference, "both")


def _adapted_pass():
    """(config, weights, factors, z, tokens, mask): a random model with SVF factors of its MLP,
    scales z and a left-padded batch."""
    tensors, weights, fingerprint = svf_tiny.model(seed=2)
    factors = svf_tiny.factors(tensors, fingerprint)
    rng = np.random.default_rng(3)
    z = {
        key: jnp.asarray(1.0 + 0.3 * rng.standard_normal((factors.num_layers, rank)), jnp.float32)
        for key, rank in factors.ranks().items()
    }
    tokens = jnp.asarray(rng.integers(0, svf_tiny.CONFIG.vocab_size, (3, 8)), jnp.int32)
    mask = jnp.asarray(np.arange(8)[None, :] >= np.array([[0], [2], [5]]))  # [3, 8] left-padded
    return svf_tiny.CONFIG, weights, factors, z, tokens, mask


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_teacher_forced_log_probs_equal_forward_then_token_log_probs(remat):
    config, weights, factors, z, tokens, mask = _adapted_pass()
    ones = {key: jnp.ones_like(v) for key, v in z.items()}
    scored = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))  # [3, 8]: positions whose next token is real

    def two_step(z):
        svf = svf_factors.svf_from_factors(factors, z, "merged")
        reference_svf = svf_factors.svf_from_factors(factors, ones, "merged")
        positions = model_lib.positions_from_mask(mask)
        hidden, _ = model_lib.forward(
            config, weights, tokens, positions, mask, svf=svf, remat=remat
        )
        reference, _ = model_lib.forward(
            config, weights, tokens, positions, mask, svf=reference_svf
        )
        targets = jnp.roll(tokens, -1, axis=1)
        picked, kl = logprobs.token_log_probs(weights, hidden, targets, 4, reference)
        return jnp.sum(jnp.where(scored, picked - kl, 0.0)), (picked, kl)

    def one_call(z):
        svf = svf_factors.svf_from_factors(factors, z, "merged")
        reference_svf = svf_factors.svf_from_factors(factors, ones, "merged")
        picked, kl = logprobs.teacher_forced_log_probs(
            config, weights, svf, tokens, mask, 4, remat=remat, reference_svf=reference_svf
        )
        return jnp.sum(jnp.where(scored, picked - kl, 0.0)), (picked, kl)

    (want, (want_picked, want_kl)), want_grad = jax.jit(jax.value_and_grad(two_step, has_aux=True))(
        z
    )
    (got, (got_picked, got_kl)), got_grad = jax.jit(jax.value_and_grad(one_call, has_aux=True))(z)

    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_picked[:, :-1], want_picked[:, :-1])  # last: a pad target
    np.testing.assert_array_equal(got_kl, want_kl)
    jax.tree.map(np.testing.assert_array_equal, got_grad, want_grad)

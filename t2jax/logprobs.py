"""Teacher-forced per-token log-probabilities (and KL divergences to a reference), chunked over the
sequence: the one scorer of training (policy gradient) and adaptation (CEM tie-break, likelihood
dispatch).

The policy-gradient pass (spec section 2.2) needs log pi(y_t | ...) of the generated tokens only,
and the optional KL penalty (spec section 2.3) a sum over the vocabulary at every generated
position. The fp32 logits of a whole batch ([B, T, V]: over 100 GB for 256 x 1024 x 128k) are never
materialized: a `lax.scan` walks the sequence in chunks of C positions, computes that chunk's
logits [B, C, V] from the hidden states, reduces them to [B, C] and drops them. The chunk body is
rematerialized (`jax.checkpoint`), so the backward pass also holds one chunk of logits at a time.

Both KL directions are computed per position and summed over the vocabulary:
  "ref_policy": KL(pi_ref || pi) = sum_v q_v (log q_v - log p_v), the official code's
                (`F.kl_div(log p, log q, log_target=True)`);
  "policy_ref": KL(pi || pi_ref) = sum_v p_v (log p_v - log q_v), the paper's equation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from t2jax import model as model_lib
from t2jax.config import ModelConfig
from t2jax.svf import core as svf_lib

Array = jax.Array


def _chunked(x: Array, chunk: int) -> Array:
    """[B, T, ...] -> [T / C, B, C, ...] (T must be a multiple of C)."""
    batch, length = x.shape[:2]
    if length % chunk:
        raise ValueError(f"sequence length {length} is not a multiple of the chunk size {chunk}")
    x = x.reshape(batch, length // chunk, chunk, *x.shape[2:])  # [B, T/C, C, ...]
    return jnp.moveaxis(x, 1, 0)  # [T/C, B, C, ...]


def _unchunked(x: Array) -> Array:
    """[T / C, B, C] -> [B, T]."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1)  # [B, T]


def kl_from_log_probs(policy: Array, reference: Array, direction: str) -> Array:
    """KL per position, summed over the vocabulary. policy, reference: [..., V] log-probs.

    Args:
        policy: log pi (the adapted model).
        reference: log pi_ref (the base model).
        direction: "ref_policy" for KL(pi_ref || pi) (official code) or "policy_ref" for
            KL(pi || pi_ref) (paper).

    Returns:
        [...] fp32.
    """
    if direction == "ref_policy":
        return jnp.sum(jnp.exp(reference) * (reference - policy), axis=-1)  # [...]
    if direction == "policy_ref":
        return jnp.sum(jnp.exp(policy) * (policy - reference), axis=-1)  # [...]
    raise ValueError(f"unknown KL direction {direction!r}; use 'ref_policy' or 'policy_ref'")


def token_log_probs(
    weights: model_lib.Weights,
    hidden: Array,
    targets: Array,
    chunk: int,
    reference_hidden: Array | None = None,
    kl_direction: str = "ref_policy",
) -> tuple[Array, Array | None]:
    """log softmax(logits)[target] at every position, and optionally the KL to a reference model,
    chunk by chunk.

    Args:
        weights: the decoder's weights (only the output projection is used).
        hidden: [B, T, D] final-norm hidden states; position t predicts targets[:, t].
        targets: [B, T] token ids.
        chunk: positions per chunk C (T must be a multiple of C).
        reference_hidden: [B, T, D] hidden states of the reference (base) model, or None for no
            KL; no gradient flows into them.
        kl_direction: see `kl_from_log_probs`.

    Returns:
        ([B, T] fp32 log-probabilities of the targets, [B, T] fp32 KL summed over the vocabulary
        or None without a reference).
    """

    @jax.checkpoint
    def one_chunk(hidden_chunk: Array, target_chunk: Array, reference_chunk: Array | None):
        log_probs = jax.nn.log_softmax(model_lib.logits(weights, hidden_chunk))  # [B, C, V]
        picked = jnp.take_along_axis(log_probs, target_chunk[..., None], axis=-1)[..., 0]
        if reference_chunk is None:
            return picked, None  # [B, C]
        reference = jax.nn.log_softmax(model_lib.logits(weights, reference_chunk))  # [B, C, V]
        return picked, kl_from_log_probs(log_probs, reference, kl_direction)  # [B, C] each

    def step(carry, chunk_inputs):
        return carry, one_chunk(*chunk_inputs)

    if reference_hidden is not None:
        reference_hidden = _chunked(jax.lax.stop_gradient(reference_hidden), chunk)
    inputs = (_chunked(hidden, chunk), _chunked(targets, chunk), reference_hidden)
    _, (picked, kl) = jax.lax.scan(step, None, inputs)  # [T/C, B, C] each
    return _unchunked(picked), None if kl is None else _unchunked(kl)  # [B, T] each


@functools.partial(
    jax.jit, static_argnames=("config", "chunk", "remat", "kl_direction", "scored_tail")
)
def teacher_forced_log_probs(
    config: ModelConfig,
    weights: model_lib.Weights,
    svf: svf_lib.ModelSVF | None,
    tokens: Array,
    token_mask: Array,
    chunk: int,
    *,
    remat: bool = False,
    reference_svf: svf_lib.ModelSVF | None = None,
    kl_direction: str = "ref_policy",
    scored_tail: int | None = None,
) -> tuple[Array, Array | None]:
    """Log-probability of every next token of a left-padded batch under (weights, svf): position
    t scores token t + 1 (the last position scores a pad id: mask it out).

    Args:
        config: the architecture.
        weights: the decoder's weights.
        svf: the adaptation (merged, or factored with one z per row), or None for the weights alone.
        tokens: [N, T] token ids, left-padded.
        token_mask: [N, T] bool, True for real tokens.
        chunk: positions per logits chunk C (T must be a multiple of C).
        remat: recompute each decoder layer in the backward pass (see `model.forward`).
        reference_svf: with it, also the KL to the model adapted by it (e.g. z = 1: the base
            model); its forward pass takes no gradient.
        kl_direction: see `kl_from_log_probs`.
        scored_tail: score only the last W = `scored_tail` positions (a multiple of `chunk`, at
            most T): the output projection, the largest matmul of small models, then skips the
            prompt positions of right-aligned completions. None: every position.

    Returns:
        ([N, W] fp32 log-probabilities of the next tokens, [N, W] fp32 KL summed over the
        vocabulary or None without `reference_svf`), W = `scored_tail` or T.
    """
    positions = model_lib.positions_from_mask(token_mask)  # [N, T]
    hidden, _ = model_lib.forward(
        config, weights, tokens, positions, token_mask, svf=svf, remat=remat
    )  # [N, T, D]
    reference = None
    if reference_svf is not None:
        reference, _ = model_lib.forward(
            config, weights, tokens, positions, token_mask, svf=reference_svf
        )  # [N, T, D]
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # [N, T]: the token each one predicts
    if scored_tail is not None:
        hidden, next_tokens = hidden[:, -scored_tail:], next_tokens[:, -scored_tail:]  # [N, W, .]
        reference = None if reference is None else reference[:, -scored_tail:]  # [N, W, D]
    return token_log_probs(weights, hidden, next_tokens, chunk, reference, kl_direction)

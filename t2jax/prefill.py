"""The first step of generation: the KV cache, the prompts' prefill and the first sampled token.

`prefill` runs left-padded prompts [B, P] into an empty cache. `prefill_shared` serves a batch
whose prompts share a token prefix (the classification prompt of self-adaptation's first pass, a
chat template's system prompt, few-shot shots): the prefix runs once, as one row, its keys and
values are broadcast into every row's cache, and only each row's own suffix is prefilled. The
cache then holds [prefix | left-padded suffixes | new tokens]; RoPE positions count real tokens,
so every token sits at the position a plain prefill gives it and greedy outputs are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2jax import model as model_lib
from t2jax import parallel
from t2jax.config import ModelConfig
from t2jax.padding import bucket_length, left_pad
from t2jax.svf.core import ModelSVF

Array = jax.Array

# Every decode step reads each layer's cache and then updates it in place. XLA:CPU's default copy
# insertion cannot prove that order and copies every layer's cache every step (120 copies of
# [B, K, S, H] per SmolLM2 step); its region analysis can, which makes batch-32 decode ~1.25x
# faster. The option only concerns XLA:CPU; other backends ignore it.
CACHE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def jit_over_cache(donate: str):
    """`jax.jit` for the sampler's steps: static config, `donate` donated, in-place cache."""
    return functools.partial(
        jax.jit,
        static_argnames=("config",),
        donate_argnames=(donate,),
        compiler_options=CACHE_COMPILER_OPTIONS,
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Loop state of the decode `while_loop`."""

    cache: model_lib.KVCache
    tokens: Array  # [B, N] generated ids (pad after a row is done)
    next_token: Array  # [B] last sampled id, fed at the next step
    next_position: Array  # [B] RoPE position of next_token
    done: Array  # [B] bool
    lengths: Array  # [B] int32: generated tokens before the end id
    step: Array  # [] int32: tokens generated so far (the next write column)


def sample_token(logits: Array, key: Array, temperature: Array, top_p: Array) -> Array:
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. logits: [B, V]."""

    def greedy(_):
        return first_argmax(logits)  # [B]

    def stochastic(_):
        scaled = logits / temperature  # [B, V]
        scaled = jax.lax.cond(top_p < 1.0, _nucleus_filter, lambda x, p: x, scaled, top_p)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)  # [B]

    return jax.lax.cond(temperature > 0, stochastic, greedy, None)


def first_argmax(logits: Array) -> Array:
    """`jnp.argmax(logits, axis=-1)` as int32 [B] (the first maximum; a NaN counts as the maximum),
    in two plain reductions: XLA:CPU runs argmax's paired (value, index) reduction about 2.5x
    slower (~4.7 ms for SmolLM2's [32, 49152] logits against ~1.9 ms)."""
    peak = jnp.max(logits, axis=-1, keepdims=True)  # [B, 1] (NaN if the row has one)
    is_peak = (logits == peak) | jnp.isnan(logits)  # [B, V]
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)  # [B, V]
    return jnp.min(jnp.where(is_peak, index, logits.shape[-1]), axis=-1)  # [B]


def _nucleus_filter(logits: Array, top_p: Array) -> Array:
    """Masks tokens outside the smallest set whose probability mass reaches top_p. [B, V]."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)  # [B, V]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)  # [B, V]
    threshold = jnp.min(kept, axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)  # [B, V]


def cache_shardings(cache: model_lib.KVCache, mesh: jax.sharding.Mesh) -> model_lib.KVCache:
    """Shardings of a cache (arrays or `ShapeDtypeStruct`s) on `mesh`: rows over the data axes,
    kv heads over the tensor axis (where they divide), the rest replicated."""

    def kv(x) -> jax.sharding.NamedSharding:  # [L, B, K, S, H] or [B, K, S, H]
        logical = (None,) * (x.ndim - 4) + ("batch", "heads", None, None)
        return jax.sharding.NamedSharding(
            mesh, parallel.logical_to_spec(logical, x.shape, mesh, parallel.ShardingRules())
        )

    return model_lib.KVCache(
        k=jax.tree.map(kv, cache.k),
        v=jax.tree.map(kv, cache.v),
        valid=parallel.batch_sharding(mesh),
        index=parallel.replicated(mesh),
    )


@functools.partial(
    jax.jit, static_argnames=("config", "batch", "length", "dtype", "stacked", "mesh")
)
def empty_cache(
    config: ModelConfig,
    batch: int,
    length: int,
    dtype: Any,
    stacked: bool,
    mesh: jax.sharding.Mesh | None,
) -> model_lib.KVCache:
    """`model.init_cache`, created on the devices already sharded (`cache_shardings`) instead of
    whole on one device and resharded: a batch-32 x 2048 cache of an 8B model is 8 GiB."""
    cache = model_lib.init_cache(config, batch, length, dtype=dtype, stacked=stacked)
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


@jit_over_cache(donate="cache")
def prefill(
    config: ModelConfig,
    weights: model_lib.Weights,
    svf: ModelSVF | None,
    tokens: Array,
    token_mask: Array,
    cache: model_lib.KVCache,
    key: Array,
    temperature: Array,
    top_p: Array,
    eos_ids: Array,
) -> DecodeState:
    """Runs the prompts [B, P] through the model into an empty cache of P + N slots (created
    outside, so XLA does not constant-fold attention to it) and samples the first new token."""
    out_length = cache.valid.shape[1] - tokens.shape[1]
    positions = model_lib.positions_from_mask(token_mask)  # [B, P]
    hidden, cache = model_lib.forward(
        config, weights, tokens, positions, token_mask, cache, svf, empty_cache=True
    )  # [B, P, D]
    return first_state(
        weights, hidden, positions, token_mask, cache, out_length, key, temperature, top_p, eos_ids
    )


def shared_prefix_length(token_lists: Sequence[Sequence[int]], minimum: int) -> int:
    """Tokens every prompt starts with, at most the shortest prompt's length - 1 (each row keeps
    a token of its own, whose logits give its first new token); 0 for a single prompt or fewer
    than `minimum` shared tokens."""
    if len(token_lists) < 2 or minimum <= 0:
        return 0
    first, limit = token_lists[0], min(map(len, token_lists)) - 1
    length = 0
    while length < limit and all(tokens[length] == first[length] for tokens in token_lists):
        length += 1
    return length if length >= minimum else 0


def split_at_prefix(
    token_lists: Sequence[Sequence[int]], shared: int, rows: int, buckets: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The host side of a shared-prefix pass: the first `shared` tokens of the first list as the
    prefix [1, Q] and every list's remaining tokens as the suffixes [rows, S], each left-padded to
    its bucket, with masks: (prefix, prefix_mask, suffixes, suffix_mask)."""
    prefix, prefix_mask = left_pad([token_lists[0][:shared]], bucket_length(shared, buckets), 1)
    suffixes = [tokens[shared:] for tokens in token_lists]
    suffix_length = bucket_length(max(map(len, suffixes)), buckets)
    return (prefix, prefix_mask, *left_pad(suffixes, suffix_length, rows))


@jit_over_cache(donate="cache")
def prefill_shared(
    config: ModelConfig,
    weights: model_lib.Weights,
    prefix: Array,
    prefix_mask: Array,
    suffixes: Array,
    suffix_mask: Array,
    prefix_cache: model_lib.KVCache,
    cache: model_lib.KVCache,
    key: Array,
    temperature: Array,
    top_p: Array,
    eos_ids: Array,
) -> DecodeState:
    """`prefill` of prompts = shared prefix + own suffix: the prefix [1, Q] (left-padded) runs
    once (`broadcast_prefix`) and the suffixes [B, S] (left-padded) are prefilled after it into
    `cache` ([B] rows, Q + S + N slots). One weight set for every row (no per-row experts)."""
    cache, positions = broadcast_prefix(
        config, weights, prefix, prefix_mask, prefix_cache, cache, suffix_mask
    )  # positions: [B, S]
    hidden, cache = model_lib.forward(
        config, weights, suffixes, positions, suffix_mask, cache
    )  # [B, S, D]
    out_length = cache.valid.shape[1] - prefix.shape[1] - suffixes.shape[1]
    return first_state(
        weights, hidden, positions, suffix_mask, cache, out_length, key, temperature, top_p, eos_ids
    )


def broadcast_prefix(
    config: ModelConfig,
    weights: model_lib.Weights,
    prefix: Array,
    prefix_mask: Array,
    prefix_cache: model_lib.KVCache,
    cache: model_lib.KVCache,
    suffix_mask: Array,
    prefix_svf: ModelSVF | None = None,
) -> tuple[model_lib.KVCache, Array]:
    """The shared prefix [1, Q] (left-padded) run once, under `prefix_svf`, into `prefix_cache`
    (1 row, Q slots) and its keys and values written into slots [0, Q) of every row of `cache`
    ([B] rows), whose index then points after them; with the RoPE positions [B, S] of the rows'
    own suffixes (left-padded, `suffix_mask` [B, S]) that follow the prefix."""
    prefix_positions = model_lib.positions_from_mask(prefix_mask)  # [1, Q]
    _, prefix_cache = model_lib.forward(
        config,
        weights,
        prefix,
        prefix_positions,
        prefix_mask,
        prefix_cache,
        prefix_svf,
        empty_cache=True,
    )
    width = prefix.shape[1]

    def broadcast_into(
        slots: Array, shared: Array
    ) -> Array:  # [..., B, K, S, H], [..., 1, K, Q, H]
        rows = jnp.broadcast_to(shared, (*slots.shape[:-2], width, slots.shape[-1]))
        return jax.lax.dynamic_update_slice_in_dim(slots, rows.astype(slots.dtype), 0, axis=-2)

    rows = suffix_mask.shape[0]
    cache = model_lib.KVCache(
        k=jax.tree.map(broadcast_into, cache.k, prefix_cache.k),
        v=jax.tree.map(broadcast_into, cache.v, prefix_cache.v),
        valid=cache.valid.at[:, :width].set(jnp.broadcast_to(prefix_mask, (rows, width))),
        index=jnp.asarray(width, jnp.int32),
    )
    prefix_length = jnp.sum(prefix_mask).astype(jnp.int32)
    return cache, prefix_length + model_lib.positions_from_mask(suffix_mask)  # [B, S]


def first_state(
    weights: model_lib.Weights,
    hidden: Array,
    positions: Array,
    token_mask: Array,
    cache: model_lib.KVCache,
    out_length: int,
    key: Array,
    temperature: Array,
    top_p: Array,
    eos_ids: Array,
) -> DecodeState:
    """The decode state after a prefill whose hidden states [B, T, D] (positions and mask
    [B, T]) fill `cache`, with `out_length` slots left for new tokens: the first new token is
    sampled from the last position's logits."""
    batch = hidden.shape[0]
    last_logits = model_lib.logits(weights, hidden[:, -1])  # [B, V]
    first = sample_token(last_logits, jax.random.fold_in(key, 0), temperature, top_p)  # [B]
    empty_row = ~jnp.any(token_mask, axis=-1)  # [B] batch-padding rows
    done = jnp.isin(first, eos_ids) | empty_row  # [B]
    out = jnp.zeros((batch, out_length), jnp.int32).at[:, 0].set(jnp.where(done, 0, first))
    return DecodeState(
        cache=cache,
        tokens=out,
        next_token=first,
        next_position=positions[:, -1] + 1,
        done=done,
        lengths=jnp.where(done, 0, 1).astype(jnp.int32),
        step=jnp.ones((), jnp.int32),
    )

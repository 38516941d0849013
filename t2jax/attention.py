"""Grouped-query attention over new tokens and a KV cache, and the cache's writes.

Axis letters as in `t2jax.model`: B batch, T query length, S cache length, N query heads, K
key/value heads, G query heads per kv head (N/K), H head dim, M = G*T folded query rows.

`attend` is what a decoder layer calls. On the CPU, a decode step (one new token per row) over a
bf16 cache goes to the native kernel (`t2jax.native.decode_attention`), which reads only the
slots each row sees and writes the new keys and values into the cache in place; everything else,
and every other platform, runs `grouped_attention` and `write_slots` in XLA.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from t2jax import native

Array = jax.Array
LayerCache = tuple[Array, Array]  # k, v [B, K, S, H]


def attend(
    q: Array,
    k: Array,
    v: Array,
    layer_cache: LayerCache | None,
    masks: tuple[Array, Array | None],
    write_index: Array | None,
) -> tuple[Array, LayerCache | None]:
    """Attention of the new tokens to the cache and to each other, and the cache with them.

    Args:
        q: [B, T, N, H] queries of the new tokens.
        k, v: [B, K, T, H] their keys and values.
        layer_cache: (k, v) [B, K, S, H] as before this call; None without a cache.
        masks: the new tokens' causal mask [B, T, T] and the cache mask [B, T, S] (None when the
            cache holds nothing yet, a prefill: it is written, not attended to).
        write_index: the cache slot of the first new token.

    Returns:
        [B, T, N*H] and the cache with the new keys and values at `write_index` (None without).
    """
    new_mask, cached_mask = masks
    if layer_cache is None:
        return grouped_attention(q, [(k, v, new_mask)]), None
    xla = functools.partial(attend_in_xla, new_mask=new_mask, cached_mask=cached_mask)
    if cached_mask is None or not native.wants_decode_attention(q, *layer_cache):
        return xla(q, k, v, *layer_cache, write_index)
    native_step = functools.partial(attend_natively, new_mask=new_mask, cached_mask=cached_mask)
    return jax.lax.platform_dependent(
        q, k, v, *layer_cache, write_index, cpu=native_step, default=xla
    )


def attend_in_xla(q, k, v, k_cache, v_cache, write_index, *, new_mask, cached_mask):
    """`attend` with a cache, by `grouped_attention` and `write_slots`, on any platform: q
    [B, T, N, H], k, v [B, K, T, H], caches [B, K, S, H]; returns [B, T, N*H] and the caches."""
    blocks = [(k, v, new_mask)]  # the new tokens among themselves
    if cached_mask is not None:
        blocks.insert(0, (k_cache, v_cache, cached_mask))
    start = (0, 0, write_index, 0)
    written = write_slots(k_cache, k, start), write_slots(v_cache, v, start)  # [B, K, S, H] x2
    return grouped_attention(q, blocks), written


def attend_natively(q, k, v, k_cache, v_cache, write_index, *, new_mask, cached_mask):
    """`attend_in_xla` for one new token per row (T = 1) over bf16 caches, by the native CPU
    kernel (`native.decode_attention`; the program must run on the CPU)."""
    batch, _, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[1]
    folded = q.reshape(batch, num_kv, num_heads // num_kv, head_dim)  # [B, K, G, H] (T = 1)
    out, k_cache, v_cache = native.decode_attention(
        folded,
        k,
        v,
        k_cache,
        v_cache,
        cached_mask[:, 0],  # [B, S]
        new_mask[:, 0, 0],  # [B]
        write_index,
    )  # [B, K, G, H], and the caches with the new slot
    return out.astype(q.dtype).reshape(batch, 1, num_heads * head_dim), (k_cache, v_cache)


def cache_mask(
    write_index: Array, length: int, cache_valid: Array, sliding_window: int | None
) -> Array:
    """Boolean [B, T, S]: which cache slots (all written before this call, so never in the
    future) the T new tokens see: real tokens only, and (Mistral) inside the sliding window. Left
    padding keeps real tokens in consecutive slots, so slot distance equals position distance."""
    query_slots = write_index + jnp.arange(length)  # [T]
    key_slots = jnp.arange(cache_valid.shape[1])  # [S]
    visible = cache_valid[:, None, :]  # [B, 1, S]
    if sliding_window is not None:
        visible = visible & (query_slots[:, None] - key_slots[None, :] < sliding_window)
    return jnp.broadcast_to(visible, (cache_valid.shape[0], length, cache_valid.shape[1]))


def causal_mask(token_mask: Array, sliding_window: int | None) -> Array:
    """Boolean [B, T, T]: causal attention among the new tokens, real keys only, windowed."""
    length = token_mask.shape[1]
    offsets = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]  # [T, T] query - key
    visible = offsets >= 0  # [T, T]
    if sliding_window is not None:
        visible &= offsets < sliding_window
    return visible[None] & token_mask[:, None, :]  # [B, T, T]


def grouped_attention(q: Array, blocks: Sequence[tuple[Array, Array, Array]]) -> Array:
    """Grouped-query attention over several key/value blocks with one joint softmax.

    Args:
        q: [B, T, N, H] queries.
        blocks: (k [B, K, S_i, H], v [B, K, S_i, H], mask [B, T, S_i]) per block, e.g. the cache
            as it was before this call and the new tokens. Attending to them as separate blocks
            (instead of writing the new tokens into the cache first and reading it back) lets XLA
            update the cache in place without copying it every decode step.

    Returns:
        [B, T, N*H]. Query heads of a kv group are folded with the query positions into one
        matmul dimension (M = G*T), so the matmuls are batched over (B, K) with contiguous
        operands (~4x faster on XLA:CPU than a [B, T, K, G, H] x [B, S, K, H] einsum).
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv = blocks[0][0].shape[1]
    groups = num_heads // num_kv
    q = q.reshape(batch, length, num_kv, groups, head_dim)  # [B, T, K, G, H]
    q = q.transpose(0, 2, 3, 1, 4).reshape(batch, num_kv, groups * length, head_dim)  # [B,K,M,H]
    scores = [_block_scores(q, k, mask, groups) for k, _, mask in blocks]  # [B, K, M, S_i] each
    peak = jnp.max(jnp.stack([jnp.max(s, axis=-1) for s in scores]), axis=0)  # [B, K, M]
    weights = [jnp.exp(s - peak[..., None]) for s in scores]  # [B, K, M, S_i] each
    total = sum(jnp.sum(w, axis=-1) for w in weights)  # [B, K, M]
    out = sum(
        jnp.einsum("bkms,bksh->bkmh", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
        for w, (_, v, _) in zip(weights, blocks, strict=True)
    )  # [B, K, M, H]
    out = (out / total[..., None]).astype(q.dtype)  # [B, K, M, H]
    out = out.reshape(batch, num_kv, groups, length, head_dim)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads * head_dim)  # [B,T,N*H]


def write_slots(cache: Array, new: Array, start: tuple) -> Array:
    """`cache` with `new` written at `start` (a dynamic update slice in the cache's dtype).

    When `new` must be narrowed first (fp32 activations into a bf16 cache), XLA moves the
    narrowing convert past the update slice, which then converts the layer's whole cache to fp32
    and back at every write (~0.15 ms per layer and step for SmolLM2 at batch 32 on XLA:CPU).
    Writing the narrowed values' bit patterns as unsigned integers keeps the convert on `new`;
    the bits are the same. (On XLA:CPU the write is then a copy of the layer's cache, not in
    place, since the fusion ends in a bitcast; without a convert the plain update is in place.)"""
    if new.dtype == cache.dtype:
        return jax.lax.dynamic_update_slice(cache, new, start)  # [B, K, S, H]
    bits = jnp.dtype(f"uint{8 * cache.dtype.itemsize}")
    written = jax.lax.dynamic_update_slice(
        jax.lax.bitcast_convert_type(cache, bits),
        jax.lax.bitcast_convert_type(new.astype(cache.dtype), bits),
        start,
    )  # [B, K, S, H]
    return jax.lax.bitcast_convert_type(written, cache.dtype)


def _block_scores(q: Array, k: Array, mask: Array, groups: int) -> Array:
    """Masked scaled scores [B, K, M, S] of folded queries q [B, K, M, H] against k [B, K, S, H]."""
    batch, length, keys = mask.shape
    q = q.astype(k.dtype)  # [B, K, M, H] (a bf16 cache is read as bf16)
    scores = jnp.einsum("bkmh,bksh->bkms", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])  # [B, K, M, S]
    visible = jnp.broadcast_to(mask[:, None, None], (batch, 1, groups, length, keys))
    visible = visible.reshape(batch, 1, groups * length, keys)  # [B, 1, M, S]
    return jnp.where(visible, scores, jnp.finfo(jnp.float32).min)  # [B, K, M, S]

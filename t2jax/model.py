"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) as pure functions over pytrees.

Numerically identical to transformers' PyTorch models: HF's rotate-half RoPE layout (no q/k
permutation, so SVD factors line up with HF weights), Llama-3 rope scaling, grouped-query attention,
SwiGLU MLP, RMSNorm computed in fp32, optional q/k/v biases (Qwen2).

Axis letters used in shape comments and einsums:
  B batch, T query length, S key/cache length, D model width, F MLP width, N query heads,
  K key/value heads, G query heads per kv head (N/K), H head dim, V vocab, L layers, R SVD rank.

Layer weights are dicts keyed by HF module names ("self_attn.q_proj", "mlp.down_proj", ...), with
kernels in `x @ W` orientation ([in, out], the transpose of HF's [out, in]). `Weights.layers` is
either *stacked* (one dict of [L, ...] arrays, run with `lax.scan`: flat compile time, the norm on
TPU/GPU) or *unstacked* (a tuple of per-layer dicts, run with an unrolled loop: on XLA:CPU slicing
a layer out of a stacked array inside the loop copies it every step, which halves decode speed).
`stack_layers` / `unstack_layers` convert between the two.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from t2jax import attention, ops, rope
from t2jax.adapters import core as adapters
from t2jax.config import ModelConfig
from t2jax.svf import core as svf_lib

Array = jax.Array
LayerDict = dict[str, Array]
Layers = LayerDict | tuple[LayerDict, ...]
# What the forward applies to named kernels: SVF (merged or factored) or LoRA / IA3 / DoRA.
LayerAdaptation = svf_lib.LayerSVF | adapters.LayerAdapters
Adaptation = svf_lib.ModelSVF | adapters.ModelAdapters

ATTN_KERNELS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_KERNELS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
QKV_BIASES = tuple(f"{name}.bias" for name in ATTN_KERNELS[:3])
# Fused kernel -> the kernels whose columns it concatenates, in order (`fuse_projections`).
FUSED_GROUPS = {"self_attn.qkv_proj": ATTN_KERNELS[:3], "mlp.gate_up_proj": MLP_KERNELS[:2]}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Weights:
    """Decoder parameters. `lm_head` is None when the embedding is tied."""

    embed: Array  # [V, D]
    layers: Layers  # stacked {name: [L, ...]} or tuple of L {name: [...]}
    final_norm: Array  # [D]
    lm_head: Array | None  # [D, V]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated key/value cache. Rows are left-padded, so every row writes the same slot at a
    given step and one scalar `index` (the next slot to write) serves the whole batch.

    Its layer layout follows the weights: stacked [L, ...] arrays (scan) or per-layer tuples.
    """

    k: Array | tuple[Array, ...]  # [L, B, K, S, H] or L x [B, K, S, H]
    v: Array | tuple[Array, ...]  # same as k
    valid: Array  # [B, S] bool: slot holds a real (non-pad) token
    index: Array  # [] int32


def is_stacked(layers: Layers) -> bool:
    """Whether `layers` is one dict of [L, ...] arrays (rather than a tuple of per-layer dicts)."""
    return not isinstance(layers, tuple)


def stack_layers(layers: Layers) -> LayerDict:
    """Converts per-layer dicts to one dict of [L, ...] arrays (no-op when already stacked)."""
    if is_stacked(layers):
        return layers
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def unstack_layers(layers: Layers) -> tuple[LayerDict, ...]:
    """Converts a dict of [L, ...] arrays to a tuple of per-layer dicts (no-op when unstacked)."""
    if not is_stacked(layers):
        return layers
    num_layers = len(next(iter(layers.values())))
    return tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(num_layers))


def layer_slice(tree: Any, index: int) -> Any:
    """Layer `index` of a stacked tree ([L, ...] leaves) or of a tuple of per-layer trees."""
    if isinstance(tree, tuple):
        return tree[index]
    return jax.tree.map(lambda x: x[index], tree)


def fuse_projections(weights: Weights) -> Weights:
    """`weights` with each group of `FUSED_GROUPS` (q|k|v, gate|up) as one kernel whose columns
    concatenate the members' (and one bias of the q/k/v biases), members removed: decoding then
    runs one matmul per group, and per-op overhead dominates small decode steps on CPU.

    A group stays unfused in a layer that lacks a member kernel (SVF training drops adapted
    kernels) or has biases for only some members. Nothing is fused when a member's output axis is
    split over devices (tensor parallelism: `t2jax.parallel` shards heads and MLP columns over
    "tensor"), as the fused columns would no longer line up with the shards of each head. Call it
    on placed weights: under `jit`, Auto-mode shardings are not visible to that check.
    """
    layers = weights.layers
    dicts = [layers] if is_stacked(layers) else list(layers)
    names = [name for group in FUSED_GROUPS.values() for name in group]
    if any(_splits_columns(layer[name]) for layer in dicts for name in names if name in layer):
        return weights
    fused = tuple(_fuse_layer(layer) for layer in dicts)
    return dataclasses.replace(weights, layers=fused[0] if is_stacked(layers) else fused)


def _splits_columns(kernel: Array) -> bool:
    """Whether the output (last) axis of `kernel` is split over several devices."""
    tracer = isinstance(kernel, jax.core.Tracer)
    sharding = jax.typeof(kernel).sharding if tracer else getattr(kernel, "sharding", None)
    return sharding is not None and sharding.shard_shape(kernel.shape)[-1] < kernel.shape[-1]


def _fuse_layer(layer: LayerDict) -> LayerDict:
    """A layer dict (or the stacked one) with its complete groups fused (`fuse_projections`)."""
    layer = dict(layer)
    for fused_name, names in FUSED_GROUPS.items():
        biases = [f"{name}.bias" for name in names if f"{name}.bias" in layer]
        if not all(name in layer for name in names) or len(biases) not in (0, len(names)):
            continue
        layer[fused_name] = jnp.concatenate([layer.pop(name) for name in names], -1)  # [.., D, sum]
        if biases:
            layer[f"{fused_name}.bias"] = jnp.concatenate([layer.pop(b) for b in biases], -1)
    return layer


def platform_of(x: Any) -> str:
    """Platform ("cpu", "tpu", "gpu", ...) of the devices that array `x` is placed on.

    Works on concrete arrays (their sharding's devices), on tracers under `jit` (the abstract
    mesh of a `NamedSharding` argument names its device kind, also for compile-only TPU devices
    on a CPU host) and on `ShapeDtypeStruct`s with a sharding. Falls back to
    `jax.default_backend()` when `x` carries no device information (an uncommitted array).
    """
    if isinstance(x, jax.core.Tracer):
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        device = getattr(mesh, "abstract_device", None)  # None for an empty abstract mesh
        return device.platform if device is not None else jax.default_backend()
    sharding = getattr(x, "sharding", None)  # concrete array or ShapeDtypeStruct
    if sharding is None:
        return jax.default_backend()
    return next(iter(sharding.device_set)).platform


def activation_dtype(param_dtype: Any, platform: str | None = None) -> Any:
    """Dtype of the residual stream, norms, RoPE and softmax for parameters of `param_dtype`.

    fp32 on CPU: XLA:CPU runs bf16 matmuls ~1.7x faster than fp32 but bf16 elementwise work
    slower, so bf16 weights there pair with fp32 activations (matmuls cast their input, see
    `t2jax.ops.matmul`). Accelerators keep the parameter dtype. `platform` is where the program
    runs: `forward` passes the platform of the weights (`platform_of`), so a program compiled on
    a CPU host for a TPU mesh gets the TPU choice; None means `jax.default_backend()`.
    """
    platform = platform or jax.default_backend()
    return jnp.float32 if platform == "cpu" else param_dtype


def default_layout_is_stacked(mesh: jax.sharding.Mesh | None = None) -> bool:
    """Stacked layers (scan) on accelerators; unstacked (unrolled) on CPU, faster there. Decided
    by the mesh's devices (None: `jax.default_backend()`)."""
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    return platform != "cpu"


# ----------------------------------------------------------------------------------------------
# Building blocks.


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm as HF computes it: normalize in fp32, cast back, then scale."""
    x32 = x.astype(jnp.float32)  # [..., D]
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # [..., D]
    return scale * normed.astype(x.dtype)  # [..., D]


def _project(x: Array, layer: LayerDict, name: str, svf_layer: LayerAdaptation | None) -> Array:
    """x @ W (+ bias), where W is the dense kernel, for SVF targets its adapted factors, and for
    LoRA / IA3 / DoRA targets the dense kernel with the adapter applied."""
    target = None if svf_layer is None else svf_layer.targets.get(name)
    bias = layer.get(f"{name}.bias")
    if target is not None and not isinstance(target, svf_lib.SVFTarget):
        return adapters.project(x, layer[name], bias, target)  # [B, T, out]
    if target is not None:
        out = svf_lib.adapted_matmul(x, target, svf_layer.mode)  # [B, T, out]
    else:
        out = ops.matmul(x, layer[name])  # [B, T, out]
    return out if bias is None else out + bias


def _project_group(
    x: Array,
    layer: LayerDict,
    fused_name: str,
    widths: Sequence[int],
    svf_layer: LayerAdaptation | None,
) -> list[Array]:
    """`_project` of each member of group `fused_name` (`FUSED_GROUPS`, output widths `widths`).
    Unadapted, a fused kernel runs one matmul (+ bias), split, and unfused members one call for
    all (`ops.matmul_group`). With a member adapted, members project one by one, those of a fused
    layer with their column slice of the fused kernel (and bias) as their dense kernel."""
    names, fused = FUSED_GROUPS[fused_name], fused_name in layer
    ends = list(itertools.accumulate(widths))
    if svf_layer is None or not any(name in svf_layer.targets for name in names):
        members = [fused_name] if fused else names
        outs = ops.matmul_group(x, [layer[name] for name in members])  # [B, T, out] each
        biases = [layer.get(f"{name}.bias") for name in members]
        outs = [out if b is None else out + b for out, b in zip(outs, biases, strict=True)]
        return jnp.split(outs[0], ends[:-1], axis=-1) if fused else outs  # [B, T, width] each
    if not fused:
        return [_project(x, layer, name, svf_layer) for name in names]
    kernel, bias = layer[fused_name], layer.get(f"{fused_name}.bias")  # [D, sum], [sum]
    outs = []
    for name, start, end in zip(names, [0, *ends[:-1]], ends, strict=True):
        member = {name: kernel[:, start:end]}  # [D, width]
        if bias is not None:
            member[f"{name}.bias"] = bias[start:end]  # [width]
        outs.append(_project(x, member, name, svf_layer))  # [B, T, width]
    return outs


def _decoder_layer(
    config: ModelConfig,
    x: Array,
    layer: LayerDict,
    svf_layer: LayerAdaptation | None,
    layer_cache: tuple[Array, Array] | None,
    rotation: tuple[Array, Array],
    masks: tuple[Array, Array | None],
    write_index: Array,
) -> tuple[Array, tuple[Array, Array] | None]:
    """One pre-norm decoder block; returns the new residual stream and this layer's updated
    (k, v) cache [B, K, S, H] (None without a cache). The cache is attended to only when
    `masks` has a cache mask (not for a cache that holds nothing yet)."""
    batch, length, _ = x.shape
    h = rms_norm(x, layer["input_layernorm"], config.rms_norm_eps)  # [B, T, D]
    kv_width = config.num_kv_heads * config.head_dim
    widths = (config.num_heads * config.head_dim, kv_width, kv_width)  # N*H, K*H, K*H
    q, k, v = _project_group(h, layer, "self_attn.qkv_proj", widths, svf_layer)  # [B, T, width]
    q = rope.apply(q.reshape(batch, length, config.num_heads, config.head_dim), rotation)
    k = rope.apply(k.reshape(batch, length, config.num_kv_heads, config.head_dim), rotation)
    k = k.transpose(0, 2, 1, 3)  # [B, K, T, H]
    v = v.reshape(batch, length, config.num_kv_heads, config.head_dim).transpose(0, 2, 1, 3)
    attn, layer_cache = attention.attend(q, k, v, layer_cache, masks, write_index)  # [B, T, N*H]
    x = x + _project(attn, layer, "self_attn.o_proj", svf_layer)  # [B, T, D]
    h = rms_norm(x, layer["post_attention_layernorm"], config.rms_norm_eps)  # [B, T, D]
    mlp_widths = (config.intermediate_size,) * 2
    gate, up = _project_group(h, layer, "mlp.gate_up_proj", mlp_widths, svf_layer)  # [B, T, F] x2
    x = x + _project(jax.nn.silu(gate) * up, layer, "mlp.down_proj", svf_layer)  # [B, T, D]
    return x, layer_cache


# ----------------------------------------------------------------------------------------------
# Forward pass.


def init_cache(
    config: ModelConfig, batch: int, length: int, *, dtype: Any = jnp.float32, stacked: bool = True
) -> KVCache:
    """An empty cache of `length` slots per row, in the layer layout of the weights."""
    shape = (batch, config.num_kv_heads, length, config.head_dim)
    if stacked:
        k = jnp.zeros((config.num_layers, *shape), dtype)  # [L, B, K, S, H]
        v = jnp.zeros((config.num_layers, *shape), dtype)  # [L, B, K, S, H]
    else:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))  # L x [B, K, S, H]
        v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))  # L x [B, K, S, H]
    valid = jnp.zeros((batch, length), bool)  # [B, S]
    return KVCache(k=k, v=v, valid=valid, index=jnp.zeros((), jnp.int32))


def take_cache_rows(cache: KVCache, rows: Array) -> KVCache:
    """The cache of batch rows `rows` [B'] (in that order), in either layer layout. Jit-able."""

    def take(x: Array) -> Array:  # [L, B, K, S, H] or [B, K, S, H]
        return jnp.take(x, rows, axis=x.ndim - 4)  # [L, B', K, S, H] or [B', K, S, H]

    k, v = jax.tree.map(take, (cache.k, cache.v))
    valid = jnp.take(cache.valid, rows, axis=0)  # [B', S]
    return KVCache(k=k, v=v, valid=valid, index=cache.index)


def forward(
    config: ModelConfig,
    weights: Weights,
    tokens: Array,
    positions: Array,
    token_mask: Array,
    cache: KVCache | None = None,
    svf: Adaptation | None = None,
    *,
    empty_cache: bool = False,
    remat: bool = False,
) -> tuple[Array, KVCache | None]:
    """Runs the decoder and returns final-norm hidden states and the updated cache.

    Args:
        config: architecture.
        weights: parameters (stacked or unstacked layers).
        tokens: [B, T] int token ids (pad ids are arbitrary: masked out).
        positions: [B, T] RoPE positions (count of real tokens before each token).
        token_mask: [B, T] bool, True for real tokens.
        cache: KV cache (in the weights' layer layout) to attend to and append to at
            `cache.index`; None for a cache-free pass over just these tokens (training, scoring).
        svf: SVF adaptation (merged or factored) of some kernels, a LoRA / IA3 / DoRA adapter
            (`t2jax.adapters.core.ModelAdapters`), or None for the base model.
        empty_cache: `cache` holds nothing yet (a prefill): its slots are written but not
            attended to, which skips attention over S empty slots.
        remat: recompute each layer's activations in the backward pass (`jax.checkpoint`, layers
            scanned when there is no cache): one layer's activations kept, one more forward.

    Returns:
        hidden: [B, T, D] hidden states after the final norm (feed to `logits`).
        cache: the cache with these tokens written and the index advanced (None without one).
    """
    length = tokens.shape[1]
    x = jnp.take(weights.embed, tokens, axis=0)  # [B, T, D]
    x = x.astype(activation_dtype(weights.embed.dtype, platform_of(weights.embed)))  # [B, T, D]
    inv_freq = rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    rotation = rope.rotation(positions, inv_freq)  # cos, sin [B, T, 1, H]
    new_mask = attention.causal_mask(token_mask, config.sliding_window)  # [B, T, T]
    cached_mask = None
    if cache is not None and not empty_cache:
        cached_mask = attention.cache_mask(cache.index, length, cache.valid, config.sliding_window)
    write_index = None if cache is None else cache.index

    def step(x, layer_inputs):
        layer, svf_layer, layer_cache = layer_inputs
        return _decoder_layer(
            config,
            x,
            layer,
            svf_layer,
            layer_cache,
            rotation,
            (new_mask, cached_mask),
            write_index,
        )

    layers, svf_layers = weights.layers, None if svf is None else svf.layers
    step = jax.checkpoint(step) if remat else step
    if remat and cache is None:  # scanned: unrolled, XLA:CPU recomputes all layers early
        layers = stack_layers(layers)
        svf_layers = None if svf_layers is None else stack_layers(svf_layers)
    caches = None if cache is None else (cache.k, cache.v)
    if is_stacked(layers):
        x, caches = jax.lax.scan(step, x, (layers, svf_layers, caches))
    else:
        new_caches = []
        for i, layer in enumerate(layers):
            svf_layer = None if svf is None else layer_slice(svf_layers, i)
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            x, layer_cache = step(x, (layer, svf_layer, layer_cache))
            new_caches.append(layer_cache)
        if cache is not None:
            caches = tuple(c[0] for c in new_caches), tuple(c[1] for c in new_caches)
    hidden = rms_norm(x, weights.final_norm, config.rms_norm_eps)  # [B, T, D]
    if cache is None:
        return hidden, None
    valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, (0, cache.index))  # [B, S]
    return hidden, KVCache(k=caches[0], v=caches[1], valid=valid, index=cache.index + length)


def logits(weights: Weights, hidden: Array) -> Array:
    """Vocabulary logits [..., V] in fp32 from hidden states [..., D]."""
    if weights.lm_head is None:  # tied: contract with the [V, D] embedding, no transposed copy
        return ops.dot_fp32(hidden, weights.embed, transposed=True)  # [..., V]
    return ops.dot_fp32(hidden, weights.lm_head)  # [..., V]


def positions_from_mask(token_mask: Array) -> Array:
    """RoPE positions [B, T] for left-padded rows: the number of real tokens before each one."""
    return jnp.maximum(jnp.cumsum(token_mask, axis=-1) - 1, 0).astype(jnp.int32)

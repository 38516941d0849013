"""The native CPU kernels (`t2jax.native`): rows times matrices against XLA's dot, decode
attention against XLA's attention, and where the decoder uses them."""

from __future__ import annotations

import concurrent.futures
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from t2jax import attention, loading, model, native, ops
from t2jax.checkpoints import load_checkpoint
from t2jax.sampler import Sampler

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)


@pytest.fixture
def fresh_availability():
    """`available` decided again by the test, and again after it."""
    native.available.cache_clear()
    yield
    native.available.cache_clear()


def bf16_pair(rows: int, depth: int, width: int, transposed: bool, seed: int = 0):
    x_key, w_key = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(x_key, (rows, 1, depth), jnp.bfloat16)  # [rows, 1, in]
    shape = (width, depth) if transposed else (depth, width)
    return x, jax.random.normal(w_key, shape, jnp.bfloat16)


@needs_compiler
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    ("rows", "depth", "width"),
    # depth sliced; narrow rows (prefetched); wider than one tile's sums; odd shapes and tails
    [(1, 1536, 576), (1, 576, 1536), (1, 300, 9000), (2, 37, 101), (5, 130, 7), (3, 2, 2731)],
)
def test_rowdot_matches_xla_dot(rows, depth, width, transposed):
    assert native.available()
    x, kernel = bf16_pair(rows, depth, width, transposed)
    lowered = jax.jit(native.rowdot, static_argnums=2).lower(x, kernel, transposed)
    assert native.TARGET in lowered.as_text()  # the kernel, not a fallback
    out = lowered.compile()(x, kernel)  # [rows, 1, width]
    expected = native.xla_dot(x, kernel, transposed)
    assert out.shape == expected.shape == (rows, 1, width) and out.dtype == jnp.float32
    # Both accumulate exact bf16 products in fp32; only the summation order differs.
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=1e-5 * scale)


@needs_compiler
def test_rowdot_in_a_loop_and_its_gradient():
    x, kernel = bf16_pair(1, 64, 96, transposed=False)

    def looped(dot, x, kernel):
        def body(_, carry):
            return carry + dot(x + carry[..., :64].astype(x.dtype), kernel) * 1e-3

        return jax.lax.fori_loop(0, 3, body, jnp.zeros((1, 1, 96), jnp.float32))

    fast = jax.jit(lambda x, k: looped(native.rowdot, x, k))(x, kernel)
    slow = jax.jit(lambda x, k: looped(native.xla_dot, x, k))(x, kernel)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-5, atol=1e-6)

    def loss(dot, x, kernel):
        return (dot(x, kernel) ** 2).sum()

    batched = jax.vmap(native.rowdot, in_axes=(None, 0))(x, jnp.stack([kernel, -kernel]))
    np.testing.assert_allclose(np.asarray(batched[1]), -np.asarray(batched[0]))

    grads = jax.grad(lambda x, k: loss(native.rowdot, x, k), argnums=(0, 1))(x, kernel)
    expected = jax.grad(lambda x, k: loss(native.xla_dot, x, k), argnums=(0, 1))(x, kernel)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@needs_compiler
@pytest.mark.parametrize("transposed", [False, True])
def test_rowdot_of_several_kernels_is_their_dots_side_by_side(transposed):
    x, q = bf16_pair(1, 576, 576, transposed, seed=1)
    _, k = bf16_pair(1, 576, 192, transposed, seed=2)
    _, v = bf16_pair(1, 576, 7, transposed, seed=3)
    out = jax.jit(native.rowdot, static_argnums=2)(x, (q, k, v), transposed)  # [1, 1, 775]
    expected = jnp.concatenate([native.xla_dot(x, w, transposed) for w in (q, k, v)], -1)
    assert out.shape == expected.shape == (1, 1, 775)
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=0, atol=1e-5 * scale)
    grads = jax.grad(lambda ws: native.rowdot(x, ws, transposed)[..., ::7].sum())((q, k, v))
    want = jax.grad(lambda ws: native.xla_dot(x, ws, transposed)[..., ::7].sum())((q, k, v))
    for got, expect in zip(grads, want, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expect))


@needs_compiler
def test_concurrent_calls_each_get_their_own_product():
    """Calls that run at once (one has the helper threads, the others compute alone) do not mix
    their operands."""
    pairs = [bf16_pair(1, 1536, 576, transposed=False, seed=seed) for seed in range(6)]
    call = jax.jit(native.rowdot)
    expected = [np.asarray(native.xla_dot(x, w)) for x, w in pairs]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for _ in range(5):
            outs = list(pool.map(lambda pair: np.asarray(call(*pair)), pairs))
            for out, want in zip(outs, expected, strict=True):
                np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())


@needs_compiler
def test_matmul_group_takes_one_call_for_a_few_bf16_rows():
    x, q = bf16_pair(1, 64, 64, transposed=False, seed=1)
    _, k = bf16_pair(1, 64, 16, transposed=False, seed=2)
    x = x.astype(jnp.float32)  # [1, 1, 64]
    text = jax.jit(ops.matmul_group).lower(x, [q, k, k]).as_text()
    assert text.count(f"@{native.TARGET}(") == 1  # one call for the three kernels
    outs = ops.matmul_group(x, [q, k, k])
    assert [o.shape for o in outs] == [(1, 1, 64), (1, 1, 16), (1, 1, 16)]
    for out, kernel in zip(outs, [q, k, k], strict=True):
        np.testing.assert_allclose(
            np.asarray(out), np.asarray(ops.matmul(x, kernel)), rtol=1e-5, atol=1e-5
        )
    many = jnp.tile(x, (native.ROWDOT_MAX_ROWS + 1, 1, 1))  # [5, 1, 64]
    assert native.TARGET not in jax.jit(ops.matmul_group).lower(many, [q, k]).as_text()


@needs_compiler
def test_matmul_takes_the_kernel_for_a_few_bf16_rows_only():
    x, kernel = bf16_pair(1, 32, 48, transposed=False)
    x = x.astype(jnp.float32)  # the CPU's activations; matmul rounds them to the kernel's dtype

    def lowered(x, kernel):
        return jax.jit(ops.matmul).lower(x, kernel).as_text()

    assert native.TARGET in lowered(x, kernel)
    few, many = (
        jnp.tile(x, (n, 1, 1)) for n in (native.ROWDOT_MAX_ROWS, native.ROWDOT_MAX_ROWS + 1)
    )
    assert native.TARGET in lowered(few, kernel)
    assert native.TARGET not in lowered(many, kernel)
    assert native.TARGET not in lowered(x, kernel.astype(jnp.float32))  # fp32 weights
    assert native.TARGET not in lowered(x, kernel[:, :0])  # no output columns
    np.testing.assert_allclose(
        np.asarray(ops.matmul(x, kernel)),
        np.asarray(native.xla_dot(x.astype(jnp.bfloat16), kernel)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_disabled_or_unbuildable_kernel_leaves_xla_dot(fresh_availability, monkeypatch, caplog):
    x, kernel = bf16_pair(1, 16, 8, transposed=False)
    monkeypatch.setenv(native.ENABLE_ENV, "0")
    assert not native.available()
    np.testing.assert_array_equal(
        np.asarray(native.rowdot(x, kernel)), np.asarray(native.xla_dot(x, kernel))
    )

    native.available.cache_clear()
    monkeypatch.delenv(native.ENABLE_ENV)
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with caplog.at_level("WARNING", logger="t2jax.native"):
        assert not native.available()
    assert "native kernels unavailable" in caplog.text
    with pytest.raises(RuntimeError, match="not available"):
        native.decode_attention(*decode_step(1, 1, 1, 16, 4))


@needs_compiler
def test_greedy_decoding_is_unchanged_by_the_kernels(fresh_availability, monkeypatch, tmp_path):
    tiny.save_tiny_checkpoint(tmp_path, "qwen2_tied", seed=3)
    checkpoint = load_checkpoint(str(tmp_path), progress=False)
    weights = loading.weights_from_hf(
        checkpoint.config, checkpoint.tensors, dtype=jnp.bfloat16, stacked=False
    )
    sampler = Sampler(checkpoint.config, weights, checkpoint.tokenizer, [tiny.VOCAB_SIZE - 1])
    hidden = jnp.zeros((1, 1, checkpoint.config.hidden_size), jnp.float32)  # [B, T, D]

    prompts = ["Hello there", "A longer prompt, so the others are left-padded", "Hi"]

    def greedy() -> tuple[list[list[int]], str]:
        jax.clear_caches()  # the kernels are chosen when a program is traced
        out = sampler.generate(prompts, max_new_tokens=12, ignore_eos=True)
        return [list(ids) for ids in out.token_ids], jax.jit(model.logits).lower(
            weights, hidden
        ).as_text()

    with_kernels, text = greedy()
    assert native.TARGET in text  # the tied head [V, D] too
    native.available.cache_clear()
    monkeypatch.setenv(native.ENABLE_ENV, "0")
    without_kernels, text = greedy()
    assert native.TARGET not in text
    assert [len(ids) for ids in with_kernels] == [12] * 3 and with_kernels == without_kernels


def decode_step(batch, kv_heads, group, head_dim, slots, seed=0):
    """Random operands of `native.decode_attention`: q [B, K, G, H], new k, v [B, K, 1, H] fp32,
    bf16 caches [B, K, S, H], scattered visible slots [B, S], new_visible [B], and a slot. Row 0
    sees no cache slot; from B = 2 the last row does not see its own token, and from B = 4 it
    sees nothing at all."""
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (batch, kv_heads, group, head_dim))
    k, v = (jax.random.normal(key, (batch, kv_heads, 1, head_dim)) for key in keys[1:3])
    caches = (
        jax.random.normal(key, (batch, kv_heads, slots, head_dim), jnp.bfloat16)
        for key in keys[3:5]
    )
    visible = jax.random.bernoulli(keys[5], 0.6, (batch, slots)).at[0].set(False)
    if batch >= 4:
        visible = visible.at[-1].set(False)
    new_visible = (jnp.arange(batch) < batch - 1) | (batch == 1)
    return (q, k, v, *caches, visible, new_visible, jnp.int32(slots // 2))


@needs_compiler
@pytest.mark.parametrize(
    ("batch", "kv_heads", "group", "head_dim", "slots"),
    # SmolLM2's heads; Qwen-0.5B's group of 7; no whole 16-float vectors; one head, long cache;
    # a row that sees nothing
    [
        (3, 3, 3, 64, 40),
        (2, 2, 7, 64, 9),
        (3, 1, 2, 24, 19),
        (1, 1, 1, 128, 300),
        (4, 2, 3, 64, 33),
    ],
)
def test_decode_attention_matches_xla_attention(batch, kv_heads, group, head_dim, slots):
    q, k, v, k_cache, v_cache, visible, new_visible, slot = decode_step(
        batch, kv_heads, group, head_dim, slots
    )
    out, k_written, v_written = jax.jit(native.decode_attention)(
        q, k, v, k_cache, v_cache, visible, new_visible, slot
    )
    queries = q.reshape(batch, 1, kv_heads * group, head_dim)  # [B, T, N, H] (N = K*G)
    masks = (new_visible[:, None, None], visible[:, None, :])  # [B, 1, 1], [B, 1, S]
    expected, (k_expected, v_expected) = (
        attention.grouped_attention(queries, [(k_cache, v_cache, masks[1]), (k, v, masks[0])]),
        (
            attention.write_slots(k_cache, k, (0, 0, slot, 0)),
            attention.write_slots(v_cache, v, (0, 0, slot, 0)),
        ),
    )
    expected = expected.reshape(out.shape)  # [B, K, G, H]
    sees_something = np.asarray(visible.any(-1) | new_visible)  # [B]
    np.testing.assert_allclose(
        np.asarray(out)[sees_something], np.asarray(expected)[sees_something], rtol=1e-5, atol=1e-5
    )
    assert (batch >= 4) == (not sees_something.all())
    assert not np.asarray(out)[~sees_something].any()  # a query that sees nothing gets zeros
    for written, want in ((k_written, k_expected), (v_written, v_expected)):
        assert written.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(written, np.float32), np.asarray(want, np.float32))


@needs_compiler
def test_attend_takes_the_kernel_for_decode_steps_over_bf16_caches_only(
    fresh_availability, monkeypatch
):
    q, k, v, k_cache, v_cache, visible, new_visible, slot = decode_step(2, 2, 3, 64, 16)
    queries = q.reshape(2, 1, 6, 64)  # [B, T, N, H]
    masks = (new_visible[:, None, None], visible[:, None, :])

    def lowered(queries, k, v, caches, masks) -> str:
        step = functools.partial(attention.attend, masks=masks, write_index=slot)
        return jax.jit(step).lower(queries, k, v, caches).as_text()

    assert native.ATTENTION_TARGET in lowered(queries, k, v, (k_cache, v_cache), masks)
    fp32_caches = (k_cache.astype(jnp.float32), v_cache.astype(jnp.float32))
    assert native.ATTENTION_TARGET not in lowered(queries, k, v, fp32_caches, masks)
    assert native.ATTENTION_TARGET not in lowered(
        queries, k, v, (k_cache, v_cache), (masks[0], None)
    )
    two = [jnp.concatenate([x, x], axis) for x, axis in ((queries, 1), (k, 2), (v, 2))]
    two_masks = (jnp.ones((2, 2, 2), bool), jnp.concatenate([masks[1]] * 2, 1))  # T = 2
    assert native.ATTENTION_TARGET not in lowered(*two, (k_cache, v_cache), two_masks)
    native.available.cache_clear()
    monkeypatch.setenv(native.ENABLE_ENV, "0")
    assert native.ATTENTION_TARGET not in lowered(queries, k, v, (k_cache, v_cache), masks)

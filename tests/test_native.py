"""The native CPU row-times-matrix kernel (`t2jax.native`) against XLA's dot, and where the
decoder uses it."""

from __future__ import annotations

import concurrent.futures
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from t2jax import loading, model, native, ops
from t2jax.checkpoints import load_checkpoint
from t2jax.sampler import Sampler

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"
)


@pytest.fixture
def fresh_availability():
    """`rowdot_available` decided again by the test, and again after it."""
    native.rowdot_available.cache_clear()
    yield
    native.rowdot_available.cache_clear()


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
    assert native.rowdot_available()
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
    assert not native.rowdot_available()
    np.testing.assert_array_equal(
        np.asarray(native.rowdot(x, kernel)), np.asarray(native.xla_dot(x, kernel))
    )

    native.rowdot_available.cache_clear()
    monkeypatch.delenv(native.ENABLE_ENV)
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with caplog.at_level("WARNING", logger="t2jax.native"):
        assert not native.rowdot_available()
    assert "native rowdot kernel unavailable" in caplog.text


@needs_compiler
def test_greedy_decoding_at_batch_one_is_unchanged_by_the_kernel(
    fresh_availability, monkeypatch, tmp_path
):
    tiny.save_tiny_checkpoint(tmp_path, "qwen2_tied", seed=3)
    checkpoint = load_checkpoint(str(tmp_path), progress=False)
    weights = loading.weights_from_hf(
        checkpoint.config, checkpoint.tensors, dtype=jnp.bfloat16, stacked=False
    )
    sampler = Sampler(checkpoint.config, weights, checkpoint.tokenizer, [tiny.VOCAB_SIZE - 1])
    hidden = jnp.zeros((1, 1, checkpoint.config.hidden_size), jnp.float32)  # [B, T, D]

    def greedy() -> tuple[list[int], str]:
        jax.clear_caches()  # the kernel is chosen when a program is traced
        ids = sampler.generate(["Hello there"], max_new_tokens=12, ignore_eos=True).token_ids[0]
        return list(ids), jax.jit(model.logits).lower(weights, hidden).as_text()

    with_kernel, text = greedy()
    assert native.TARGET in text  # the tied head [V, D] too
    native.rowdot_available.cache_clear()
    monkeypatch.setenv(native.ENABLE_ENV, "0")
    without_kernel, text = greedy()
    assert native.TARGET not in text
    assert len(with_kernel) == 12 and with_kernel == without_kernel

"""Sampler: cache consistency, padding invariance, end ids, stop strings, no recompilation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from t2jax import attention, loading, native, parallel
from t2jax import model as model_lib
from t2jax.checkpoints import load_checkpoint
from t2jax.config import MeshConfig, SamplerConfig
from t2jax.padding import bucket_length, new_tokens_bucket
from t2jax.prefill import empty_cache, first_argmax
from t2jax.sampler import Sampler, compacted_rows
from t2jax.svf import cache as svf_cache
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets

pytest.importorskip("torch")

PROMPTS = ["Hello there", "A much longer prompt about singular values", "x"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    tiny.save_tiny_checkpoint(directory, "llama", seed=3)
    return load_checkpoint(str(directory), progress=False)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    """The tiny model in the CPU default (unrolled) layout."""
    return tiny_checkpoint, loading.weights_from_hf(
        tiny_checkpoint.config, tiny_checkpoint.tensors, stacked=False
    )


def _sampler(tiny_model, eos_ids=(tiny.VOCAB_SIZE - 1,), **config):
    checkpoint, weights = tiny_model
    return Sampler(
        checkpoint.config, weights, checkpoint.tokenizer, eos_ids, SamplerConfig(**config)
    )


def _greedy_reference(config, weights, prompt_ids, steps):
    """Greedy tokens from a full cache-free re-forward at every step. The sequence is right-padded
    to a fixed length (causal attention ignores the pads), so one compilation serves every step."""
    length = len(prompt_ids) + steps
    forward = jax.jit(model_lib.forward, static_argnums=0)
    sequence = list(prompt_ids)
    for _ in range(steps):
        tokens = jnp.asarray([sequence + [0] * (length - len(sequence))])
        mask = jnp.arange(length)[None] < len(sequence)
        hidden, _ = forward(config, weights, tokens, jnp.arange(length)[None], mask)
        sequence.append(int(jnp.argmax(model_lib.logits(weights, hidden[0, len(sequence) - 1]))))
    return sequence[len(prompt_ids) :]


@pytest.mark.parametrize("stacked", [True, False], ids=["scan", "unrolled"])
def test_greedy_with_cache_equals_argmax_of_full_reforward(tiny_checkpoint, stacked):
    weights = loading.weights_from_hf(
        tiny_checkpoint.config, tiny_checkpoint.tensors, stacked=stacked
    )
    tiny_model = (tiny_checkpoint, weights)
    sampler = _sampler(tiny_model)
    generation = sampler.generate(PROMPTS, max_new_tokens=12)
    for prompt, generated in zip(sampler.encode(PROMPTS), generation.token_ids, strict=True):
        assert generated == _greedy_reference(tiny_checkpoint.config, weights, prompt, 12)
    assert generation.lengths == [12, 12, 12]
    assert generation.finish_reasons == ["length"] * 3


def test_left_padding_amount_does_not_change_tokens(tiny_model):
    alone = _sampler(tiny_model).generate(PROMPTS[:1], max_new_tokens=10)
    in_batch = _sampler(tiny_model).generate(PROMPTS, max_new_tokens=10)
    wide_bucket = _sampler(tiny_model, prompt_buckets=(200,)).generate(PROMPTS, max_new_tokens=10)

    assert alone.token_ids[0] == in_batch.token_ids[0] == wide_bucket.token_ids[0]
    assert in_batch.token_ids == wide_bucket.token_ids


def test_stops_on_any_of_several_end_ids(tiny_model):
    free = _sampler(tiny_model).generate(PROMPTS, max_new_tokens=16)
    # Pick, per row, a token it generates; each row must stop before its first occurrence.
    end_ids = {free.token_ids[0][3], free.token_ids[1][6]}
    stopped = _sampler(tiny_model, eos_ids=tuple(end_ids)).generate(PROMPTS, max_new_tokens=16)

    for free_ids, ids, reason in zip(
        free.token_ids, stopped.token_ids, stopped.finish_reasons, strict=True
    ):
        first_end = next((i for i, t in enumerate(free_ids) if t in end_ids), None)
        if first_end is None:
            assert ids == free_ids and reason == "length"
        else:
            assert ids == free_ids[:first_end] and reason == "eos"
    assert stopped.finish_reasons[:2] == ["eos", "eos"]


def test_stop_string_truncates_text_and_ends_generation_early(tiny_model):
    free = _sampler(tiny_model).generate(PROMPTS[:2], max_new_tokens=120)
    stop = free.texts[0][5:8]
    assert stop, "the tiny model generated too little text for this test"
    stopped = _sampler(tiny_model).generate(PROMPTS[:2], max_new_tokens=120, stop_strings=[stop])

    assert stopped.texts[0] == free.texts[0][: free.texts[0].find(stop)]
    assert stopped.finish_reasons[0] == "stop"
    assert len(stopped.token_ids[0]) < 120  # decoding ended at the next stop-string check


def test_no_recompilation_across_max_new_tokens_and_temperature(tiny_model):
    from t2jax import sampler as sampler_lib

    sampler = _sampler(tiny_model)
    sampler.generate(PROMPTS, max_new_tokens=20)
    compiled = (sampler_lib.prefill._cache_size(), sampler_lib.decode._cache_size())
    sampler.generate(PROMPTS, max_new_tokens=45, temperature=0.7, top_p=0.9, seed=4)
    sampler.generate(PROMPTS[::-1], max_new_tokens=3, temperature=1.3)

    assert (sampler_lib.prefill._cache_size(), sampler_lib.decode._cache_size()) == compiled


def test_sampling_is_seeded_and_temperature_matters(tiny_model):
    sampler = _sampler(tiny_model)
    first = sampler.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=7)
    again = sampler.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=7)
    other = sampler.generate(PROMPTS, max_new_tokens=16, temperature=1.0, seed=8)
    greedy = sampler.generate(PROMPTS, max_new_tokens=16)

    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    assert first.token_ids != greedy.token_ids


def test_tiny_top_p_is_greedy(tiny_model):
    sampler = _sampler(tiny_model)
    nucleus = sampler.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=3)
    greedy = sampler.generate(PROMPTS, max_new_tokens=10)
    assert nucleus.token_ids == greedy.token_ids


def test_bucketing_helpers():
    assert bucket_length(10, (64, 128)) == 64
    assert bucket_length(65, (64, 128)) == 128
    assert bucket_length(300, (64, 128)) == 384
    assert new_tokens_bucket(1) == 64
    assert new_tokens_bucket(100) == 128
    assert new_tokens_bucket(512) == 512


def test_compacted_rows_keeps_the_live_rows_and_halves_the_batch():
    done = np.array([True, False, True, True, False, True, True, True])
    assert compacted_rows(done).tolist() == [1, 4]
    assert compacted_rows(done, multiple=4).tolist() == [0, 1, 2, 4]  # live rows + 2 finished
    assert compacted_rows(np.array([False] + [True] * 7)).tolist() == [0]
    assert compacted_rows(np.array([True] * 4 + [False] * 4)).tolist() == [4, 5, 6, 7]
    assert compacted_rows(np.array([False] * 5 + [True] * 3)) is None  # 8 rows: no smaller
    assert compacted_rows(done, multiple=8) is None


@pytest.mark.parametrize("stacked", [True, False], ids=["scan", "unrolled"])
def test_take_cache_rows_in_both_layer_layouts(tiny_checkpoint, stacked):
    config, rows = tiny_checkpoint.config, jnp.asarray([3, 0])
    empty = model_lib.init_cache(config, 4, 8, stacked=stacked)

    def numbered(x):
        return jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)

    k, v = jax.tree.map(numbered, (empty.k, empty.v))
    valid = jax.random.bernoulli(jax.random.key(0), shape=empty.valid.shape)  # [B, S]
    cache = model_lib.KVCache(k=k, v=v, valid=valid, index=jnp.int32(5))
    taken = model_lib.take_cache_rows(cache, rows)

    batch_axis = 1 if stacked else 0  # [L, B, K, S, H] or L x [B, K, S, H]
    for got, full in zip(jax.tree.leaves((taken.k, taken.v)), jax.tree.leaves((k, v)), strict=True):
        np.testing.assert_array_equal(got, jnp.take(full, rows, axis=batch_axis))
    np.testing.assert_array_equal(taken.valid, valid[rows])
    assert int(taken.index) == 5


def _per_row_expert_svf(tiny_model, rows):
    """Factored SVF of the MLP kernels with a different random z per batch row."""
    checkpoint, _ = tiny_model
    config, tensors, targets = checkpoint.config, checkpoint.tensors, svf_targets.TARGET_SETS["mlp"]
    factors = svf_factors.decompose(
        config,
        svf_factors.kernels_from_tensors(tensors),
        targets,
        fingerprint=svf_cache.fingerprint(config, tensors),
        placement=svf_factors.Placement(stacked=False),
        progress=False,
    )
    z = {
        key: jax.random.uniform(jax.random.key(i), (layers, rows, rank), maxval=2.0)  # [L, B, R]
        for i, (key, (layers, rank)) in enumerate(
            svf_targets.svf_param_shapes(config, targets).items()
        )
    }
    return svf_factors.svf_from_factors(factors, z, "factored")


@pytest.mark.parametrize("variant", ["base", "per_row_experts", "batch_sharded"])
def test_compaction_drops_finished_rows_and_keeps_every_output(tiny_model, monkeypatch, variant):
    """Rows that end early (end id or stop string) leave the batch at the first check, leaving
    the two live rows (with their own experts; padded to the 8 data-parallel shards when
    sharded); every row's tokens, text and finish reason equal a non-compacting run."""
    from t2jax import parallel
    from t2jax import sampler as sampler_lib
    from t2jax.config import MeshConfig

    prompts = [*PROMPTS, "abc", "The cat", "SVD", "zz top", "q", *(f"row {i}" for i in range(8))]
    budget, chunk, live = 80, sampler_lib.STOP_CHECK_CHUNK, [3, 7]
    svf = _per_row_expert_svf(tiny_model, len(prompts)) if variant == "per_row_experts" else None
    free = _sampler(tiny_model, compact_rows=False).generate(
        prompts, max_new_tokens=budget, svf=svf
    )
    ending = [row for row in range(1, len(prompts)) if row not in live]
    end_ids = tiny.early_end_ids(free.token_ids, ending, [0, *live], within=chunk)
    stop = free.texts[0][:2]  # row 0 ends by this stop string (it holds no end id)
    assert all(stop not in free.texts[row] for row in live)
    sizes = []
    take_rows = sampler_lib.take_rows

    def counting_take_rows(state, svf, rows):
        sizes.append(len(rows))
        return take_rows(state, svf, rows)

    monkeypatch.setattr(sampler_lib, "take_rows", counting_take_rows)
    settings = dict(max_new_tokens=budget, stop_strings=[stop], svf=svf)
    sharding = {}
    if variant == "batch_sharded":
        mesh = parallel.make_mesh(MeshConfig(shape=(8, 1, 1)))
        sharding = dict(batch_sharding=parallel.batch_sharding(mesh), batch_multiple=8)
    checkpoint, weights = tiny_model
    compacted = Sampler(
        checkpoint.config, weights, checkpoint.tokenizer, end_ids, **sharding
    ).generate(prompts, **settings)
    assert sizes == ([8] if variant == "batch_sharded" else [2])
    reference = _sampler(tiny_model, end_ids, compact_rows=False).generate(prompts, **settings)

    assert compacted == reference
    assert compacted.finish_reasons[0] == "stop"
    assert [compacted.lengths[row] for row in live] == [budget, budget]
    assert max(compacted.lengths[row] for row in ending) < chunk


def test_bad_arguments_are_clear_errors(tiny_model):
    sampler = _sampler(tiny_model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate([[]], max_new_tokens=3)
    with pytest.raises(ValueError, match="end-of-sequence"):
        _sampler(tiny_model, eos_ids=())


def test_batch_sharded_generation_equals_unsharded(tiny_model):
    from t2jax import parallel
    from t2jax.config import MeshConfig

    checkpoint, weights = tiny_model
    mesh = parallel.make_mesh(MeshConfig(shape=(8, 1, 1)))
    sharded = Sampler(
        checkpoint.config,
        weights,
        checkpoint.tokenizer,
        (tiny.VOCAB_SIZE - 1,),
        batch_sharding=parallel.batch_sharding(mesh),
        batch_multiple=8,
    ).generate(PROMPTS, max_new_tokens=8)
    assert sharded.token_ids == _sampler(tiny_model).generate(PROMPTS, max_new_tokens=8).token_ids


def test_ignore_eos_generates_the_full_budget(tiny_model):
    free = _sampler(tiny_model).generate(PROMPTS, max_new_tokens=16)
    end_ids = (free.token_ids[0][2], free.token_ids[1][1])
    generation = _sampler(tiny_model, eos_ids=end_ids).generate(
        PROMPTS, max_new_tokens=16, ignore_eos=True
    )

    assert generation.lengths == [16, 16, 16]
    assert generation.token_ids == free.token_ids


def test_decode_loop_updates_the_cache_in_place(tiny_model):
    """The compiled decode loop must not copy any layer's KV cache (it did, every step, before
    `CACHE_COMPILER_OPTIONS`: 4 copies per layer and step for this model)."""
    from t2jax import sampler as sampler_lib

    checkpoint, weights = tiny_model
    config, batch, length = checkpoint.config, 2, 8
    cache = model_lib.init_cache(config, batch, length + 64, stacked=False)
    controls = (jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.asarray([-1]))
    tokens, mask = jnp.ones((batch, length), jnp.int32), jnp.ones((batch, length), bool)
    state = sampler_lib.prefill(config, weights, None, tokens, mask, cache, *controls)
    hlo = sampler_lib.decode.lower(config, weights, None, state, *controls, jnp.int32(9))
    cache_shape = ",".join(map(str, state.cache.k[0].shape))
    copies = re.findall(rf"f32\[{cache_shape}\]\S* copy\(", hlo.compile().as_text())
    assert copies == []


@pytest.mark.parametrize("kernels", ["native", "xla"])
def test_decode_loop_keeps_a_bf16_cache_in_bf16_and_in_place(tiny_checkpoint, monkeypatch, kernels):
    """With bf16 weights and cache, no fp32 array of a layer's cache shape may appear in the
    compiled decode loop: XLA:CPU ran the bf16 cache write in fp32, converting every layer's
    whole cache to fp32 and back at every step, until `attention.write_slots` wrote its bits.
    With the native kernels, the decode attention writes each layer's cache in place: one call
    per layer, and no copy of a cache."""
    from t2jax import sampler as sampler_lib

    if kernels == "xla":
        monkeypatch.setenv(native.ENABLE_ENV, "0")
    native.available.cache_clear()
    if kernels == "native" and not native.available():
        pytest.skip("the native kernels do not build here")
    jax.clear_caches()  # the kernels are chosen when a program is traced
    config, batch, length = tiny_checkpoint.config, 2, 8
    weights = loading.weights_from_hf(
        config, tiny_checkpoint.tensors, dtype=jnp.bfloat16, stacked=False
    )
    cache = model_lib.init_cache(config, batch, length + 64, dtype=jnp.bfloat16, stacked=False)
    controls = (jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.asarray([-1]))
    tokens, mask = jnp.ones((batch, length), jnp.int32), jnp.ones((batch, length), bool)
    state = sampler_lib.prefill(config, weights, None, tokens, mask, cache, *controls)
    hlo = sampler_lib.decode.lower(config, weights, None, state, *controls, jnp.int32(9))
    text = hlo.compile().as_text()
    native.available.cache_clear()
    jax.clear_caches()
    cache_shape = ",".join(map(str, state.cache.k[0].shape))
    assert state.cache.k[0].dtype == jnp.bfloat16
    assert re.findall(rf"f32\[{cache_shape}\]", text) == []
    calls = text.count(f'custom_call_target="{native.ATTENTION_TARGET}"')
    if kernels == "native":
        assert calls == config.num_layers
        assert re.findall(rf"bf16\[{cache_shape}\]\S* copy\(", text) == []
    else:
        assert calls == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_slots_is_a_dynamic_update_slice(dtype):
    cache = jax.random.normal(jax.random.key(0), (2, 3, 8, 4)).astype(dtype)  # [B, K, S, H]
    new = jax.random.normal(jax.random.key(1), (2, 3, 1, 4))  # fp32, as the layer computes it
    written = attention.write_slots(cache, new, (0, 0, 5, 0))
    expected = jax.lax.dynamic_update_slice(cache, new.astype(dtype), (0, 0, 5, 0))
    assert written.dtype == dtype
    np.testing.assert_array_equal(np.asarray(written, np.float32), np.asarray(expected, np.float32))


def test_first_argmax_matches_argmax_with_ties_and_nans():
    logits = jnp.asarray(
        [
            [0.5, 2.0, -1.0, 2.0],  # a tie: the first maximum
            [-jnp.inf, -jnp.inf, -3.0, -jnp.inf],
            [1.0, jnp.nan, 5.0, jnp.nan],  # argmax takes the first NaN
            [jnp.inf, 0.0, jnp.inf, 1.0],
        ]
    )
    np.testing.assert_array_equal(first_argmax(logits), jnp.argmax(logits, axis=-1))
    random = jax.random.normal(jax.random.key(0), (8, 1000))
    np.testing.assert_array_equal(first_argmax(random), jnp.argmax(random, axis=-1))
    assert first_argmax(random).dtype == jnp.int32


def test_bf16_weights_keep_fp32_activations_and_match_fp32(tiny_checkpoint):
    """bf16 parameters (the fast matmuls on CPU) with fp32 activations and a bf16 cache: logits
    of a cached decode step stay within bf16 rounding of the fp32 model's."""
    config, tensors = tiny_checkpoint.config, tiny_checkpoint.tensors
    tokens = jnp.asarray([[5, 9, 2, 7, 11, 3]])
    positions, mask = jnp.arange(6)[None], jnp.ones((1, 6), bool)
    fp32 = loading.weights_from_hf(config, tensors, stacked=False)
    bf16 = loading.weights_from_hf(config, tensors, dtype=jnp.bfloat16, stacked=False)
    hidden, _ = model_lib.forward(config, fp32, tokens, positions, mask)
    reference = model_lib.logits(fp32, hidden[:, -1])  # [1, V]

    cache = model_lib.init_cache(config, 1, 16, dtype=jnp.bfloat16, stacked=False)
    prompt = (tokens[:, :5], positions[:, :5], mask[:, :5])
    _, cache = model_lib.forward(config, bf16, *prompt, cache, empty_cache=True)
    hidden, cache = model_lib.forward(
        config, bf16, tokens[:, 5:], positions[:, 5:], mask[:, 5:], cache
    )
    step_logits = model_lib.logits(bf16, hidden[:, -1])  # [1, V]

    assert hidden.dtype == jnp.float32 and cache.k[0].dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(step_logits - reference))) < 0.02 * scale
    assert float(jnp.max(jnp.abs(step_logits - reference))) > 0  # bf16 really was used


@pytest.mark.parametrize("stacked", [True, False])
def test_empty_cache_is_created_sharded(tiny_checkpoint, stacked):
    """The cache comes out of `empty_cache` already split over the mesh's data axes (never whole
    on one device), and each layer's kv heads over the tensor axis."""
    mesh = parallel.make_mesh(MeshConfig(shape=(2, 2, 2)))
    cache = empty_cache(tiny_checkpoint.config, 8, 16, jnp.dtype(jnp.bfloat16), stacked, mesh)
    layer_k = cache.k if stacked else cache.k[0]  # [L, B, K, S, H] or [B, K, S, H]
    batch_axis = layer_k.ndim - 4
    shard = layer_k.addressable_shards[0].data.shape
    assert shard[batch_axis] == 8 // 4  # data x fsdp
    assert shard[batch_axis + 1] == tiny_checkpoint.config.num_kv_heads // 2  # tensor
    assert cache.valid.addressable_shards[0].data.shape == (2, 16)


def test_platform_of_follows_the_arrays_devices_under_jit():
    """Backend choices come from where the weights live, also inside `jit`."""
    mesh = parallel.make_mesh(MeshConfig(shape=(-1, 1, 1)))
    x = jax.device_put(jnp.ones(8), parallel.replicated(mesh))
    seen = []
    jax.jit(lambda y: seen.append(model_lib.platform_of(y)) or y)(x)
    assert seen == ["cpu"] and model_lib.platform_of(x) == "cpu"
    assert model_lib.activation_dtype(jnp.bfloat16, "tpu") == jnp.bfloat16
    assert model_lib.activation_dtype(jnp.bfloat16, "cpu") == jnp.float32
    assert not model_lib.default_layout_is_stacked(mesh)


SHARED_PREFIX = "Classify the request below as math, code, reasoning or other, then answer it. "


@pytest.mark.parametrize("variant", ["unrolled", "scan", "batch_sharded"])
def test_shared_prefix_is_prefilled_once_with_the_same_outputs(
    tiny_checkpoint, monkeypatch, variant
):
    """Prompts that share a prefix (one of them the prefix and one more token) prefill it once as
    one row, and every greedy output equals the plain prefill's and a cache-free re-forward's."""
    import t2jax.sampler as sampler_lib

    prompts = [SHARED_PREFIX + prompt for prompt in [*PROMPTS, "?"]]
    weights = loading.weights_from_hf(
        tiny_checkpoint.config, tiny_checkpoint.tensors, stacked=variant == "scan"
    )
    sharding = {}
    if variant == "batch_sharded":
        mesh = parallel.make_mesh(MeshConfig(shape=(8, 1, 1)))
        sharding = dict(batch_sharding=parallel.batch_sharding(mesh), batch_multiple=8)

    def sampler(**config):
        return Sampler(
            tiny_checkpoint.config,
            weights,
            tiny_checkpoint.tokenizer,
            (tiny.VOCAB_SIZE - 1,),
            SamplerConfig(**config),
            **sharding,
        )

    shared_calls = []
    prefill_shared = sampler_lib.prefill_shared

    def counting_prefill_shared(config, weights, prefix, *args):
        shared_calls.append(prefix.shape)
        return prefill_shared(config, weights, prefix, *args)

    monkeypatch.setattr(sampler_lib, "prefill_shared", counting_prefill_shared)
    shared = sampler().generate(prompts, max_new_tokens=24)
    plain = sampler(min_shared_prefix=0).generate(prompts, max_new_tokens=24)
    prefix_tokens = len(sampler().encode([SHARED_PREFIX])[0])
    assert shared_calls == [(1, bucket_length(prefix_tokens, SamplerConfig().prompt_buckets))]
    assert shared == plain
    ids = sampler().encode(prompts[1:2])[0]
    expected = _greedy_reference(tiny_checkpoint.config, weights, ids, 24)
    assert shared.token_ids[1] == expected[: len(shared.token_ids[1])]

"""REINFORCE objective, gradients and update on a tiny random model: the loss against a direct
computation, zero rewards, the direction of one step, microbatching, 8 devices vs 1, and the host
side (advantages, batch order, completion tokens, batch layout, optimizers)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import svf_tiny
import tiny

from t2jax import loading, padding, parallel
from t2jax import model as model_lib
from t2jax.config import MeshConfig
from t2jax.rl import batch as rl_batch
from t2jax.rl import loss as rl_loss
from t2jax.rl.config import AdapterSection, RLConfig, SVFSection
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets
from t2jax.tasks import Score, reward_of

CONFIG = svf_tiny.CONFIG
TARGETS = svf_targets.TARGET_SETS["mlp"]
ADAPTER = AdapterSection()
SVF = SVFSection()
RL = RLConfig(lr=1e-2, max_grad_norm=1.0, logprob_chunk=8)


def _frozen(mesh=None, stacked=False):
    """(weights without the target kernels, factors), sharded over `mesh` when given."""
    tensors = svf_tiny.random_tensors(CONFIG, seed=4)
    place = None
    if mesh is not None:

        def place(key, array):
            return jax.device_put(array, parallel.weight_sharding(key, array.shape, mesh))

    weights = loading.weights_from_hf(
        CONFIG, tensors, stacked=stacked, skip=lambda key: key in TARGETS, place=place
    )
    fingerprint = svf_cache.fingerprint(CONFIG, tensors)
    factors = svf_tiny.factors(tensors, fingerprint, TARGETS, stacked=stacked, mesh=mesh)
    return weights, factors


@pytest.fixture(scope="module")
def frozen():
    return _frozen()


def _params(factors, seed=0, spread=0.3):
    shapes = {key: (factors.num_layers, rank) for key, rank in factors.ranks().items()}
    return svf_lib.init_params(jax.random.key(seed), shapes, std=spread)


def _sequences(rows, seed=0):
    """Random (ids, prompt length) pairs of different lengths."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(rows):
        prompt, completion = rng.integers(2, 9), rng.integers(1, 12)
        sequences.append((rng.integers(0, CONFIG.vocab_size, prompt + completion).tolist(), prompt))
    return sequences


def _batch(advantages, seed=0, rows=8):
    """A batch of len(advantages) random sequences padded to `rows` rows (one shape to compile)."""
    advantages = np.asarray(advantages, np.float32)
    sequences = _sequences(len(advantages), seed)
    host = rl_batch.assemble_batch(sequences, advantages, chunk=RL.logprob_chunk, rows=rows)
    return jax.tree.map(jnp.asarray, host), sequences


def _gradients(frozen, params, batch, rl=RL, num_microbatches=1):
    weights, factors = frozen
    options = rl_loss.LossOptions.from_config(ADAPTER, SVF, rl)
    return rl_loss.compute_gradients(
        CONFIG, options, params, weights, factors, batch, num_microbatches
    )


@jax.jit
def _full_log_probs(weights, factors, params, tokens):
    """[B, T, V] log-probs of right-padded rows (causal attention never sees the pads)."""
    svf = svf_factors.svf_from_factors(factors, svf_lib.z_of(params, SVF.parametrization))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = jnp.ones_like(tokens, bool)
    hidden, _ = model_lib.forward(CONFIG, weights, tokens, positions, mask, svf=svf)
    return jax.nn.log_softmax(model_lib.logits(weights, hidden))  # [B, T, V]


def _direct_log_likelihoods(frozen, params, sequences):
    """sum_t log pi(y_t | ...) per sequence from an independent right-padded, full-softmax pass."""
    length = max(len(ids) for ids, _ in sequences)
    tokens = jnp.asarray([ids + [0] * (length - len(ids)) for ids, _ in sequences])
    log_probs = np.asarray(_full_log_probs(*frozen, params, tokens))
    return np.asarray(
        [
            sum(log_probs[row, t - 1, ids[t]] for t in range(prompt, len(ids)))
            for row, (ids, prompt) in enumerate(sequences)
        ]
    )


def test_loss_is_minus_the_mean_of_reward_weighted_log_likelihoods(frozen):
    params = _params(frozen[1])
    advantages = [1.0, -1.0, 1.0, 0.5]
    batch, sequences = _batch(advantages)  # four padding rows must not count

    _, metrics = _gradients(frozen, params, batch)

    log_likelihoods = _direct_log_likelihoods(frozen, params, sequences)
    expected = -np.mean(np.asarray(advantages) * log_likelihoods)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-4)
    np.testing.assert_allclose(metrics["log_likelihood"], log_likelihoods.mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["tokens"], np.mean([len(i) - p for i, p in sequences]))


def test_scoring_only_the_completion_tail_keeps_loss_and_gradient(frozen):
    """The output projection runs on the last `scored_tail` positions only; scoring every
    position gives the same loss and gradient."""
    params = _params(frozen[1])
    rng = np.random.default_rng(3)
    lengths = [(20, 3), (14, 5), (9, 1)]  # (prompt, completion): long prompts, short answers
    sequences = [(rng.integers(0, CONFIG.vocab_size, p + c).tolist(), p) for p, c in lengths]
    host = rl_batch.assemble_batch(sequences, np.asarray([1.0, -1.0, 0.5]), chunk=4, rows=4)
    batch = jax.tree.map(jnp.asarray, host)
    assert (batch.scored_tail, batch.tokens.shape[1]) == (8, 24)  # prompt positions are skipped
    rl = dataclasses.replace(RL, logprob_chunk=4)
    grads, metrics = _gradients(frozen, params, batch, rl)
    every = dataclasses.replace(batch, scored_tail=None)
    all_grads, all_metrics = _gradients(frozen, params, every, rl)
    np.testing.assert_allclose(metrics["loss"], all_metrics["loss"], rtol=1e-5)
    for key in grads:
        np.testing.assert_allclose(grads[key], all_grads[key], rtol=1e-4, atol=1e-7)


def test_zero_rewards_give_a_zero_gradient(frozen):
    params = _params(frozen[1])
    zero_grads, _ = _gradients(frozen, params, _batch([0.0, 0.0, 0.0])[0])
    grads, _ = _gradients(frozen, params, _batch([1.0, 0.0, -1.0])[0])

    for key in params:
        np.testing.assert_array_equal(zero_grads[key], 0.0)
        assert float(jnp.abs(grads[key]).max()) > 0


@pytest.mark.parametrize("reward", [1.0, -1.0])
def test_one_step_moves_the_log_likelihood_with_the_reward(frozen, reward):
    weights, factors = frozen
    params = _params(factors)
    state = rl_loss.init_state(params, RL)
    batch, _ = _batch([reward], seed=3)
    _, before = _gradients(frozen, params, batch)

    options = rl_loss.LossOptions.from_config(ADAPTER, SVF, RL)
    state, _ = rl_loss.train_step(CONFIG, options, RL, state, weights, factors, batch)
    _, after = _gradients(frozen, state.params, batch)

    change = float(after["log_likelihood"] - before["log_likelihood"])
    assert change * reward > 1e-3, change
    assert int(state.step) == 1


@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
def test_microbatched_gradients_equal_full_batch_gradients(stacked):
    frozen = _frozen(stacked=stacked)
    params = _params(frozen[1])
    rl = dataclasses.replace(RL, kl_coeff=0.2, length_normalize=True)
    batch, _ = _batch([1.0, -1.0, 0.5, -0.25, 1.0, 1.0, -1.0])

    full, full_metrics = _gradients(frozen, params, batch, rl, num_microbatches=1)
    for count in (4,) if stacked else (2,):
        micro, micro_metrics = _gradients(frozen, params, batch, rl, num_microbatches=count)
        for key in params:
            np.testing.assert_allclose(micro[key], full[key], rtol=1e-4, atol=1e-7)
        for name, value in full_metrics.items():
            np.testing.assert_allclose(micro_metrics[name], value, rtol=1e-5)
    assert float(full_metrics["kl"]) > 0  # the spread-out z differs from the base model


def test_kl_is_zero_at_the_base_model_and_penalizes_departures(frozen):
    factors = frozen[1]
    rl = dataclasses.replace(RL, kl_coeff=1.0)
    batch, _ = _batch([0.0, 0.0])
    uniform = {key: jnp.zeros_like(p) for key, p in _params(factors).items()}  # z = 0.5: W' = W

    _, at_base = _gradients(frozen, uniform, batch, rl)
    _, away = _gradients(frozen, _params(factors, spread=1.0), batch, rl)

    assert abs(float(at_base["kl"])) < 1e-4
    assert float(away["kl"]) > 1e-3
    np.testing.assert_allclose(away["loss"], away["kl"], rtol=1e-5)  # zero rewards: only the KL


def test_eight_device_step_equals_one_device_step():
    assert len(jax.devices()) == 8
    rl = dataclasses.replace(RL, kl_coeff=0.1)
    advantages = [1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.0, 1.0]
    results = []
    for mesh_config, devices in ((MeshConfig((2, 4, 1)), None), (MeshConfig((1, 1, 1)), 1)):
        mesh = parallel.make_mesh(mesh_config, jax.devices()[:devices] if devices else None)
        weights, factors = _frozen(mesh)
        params = jax.device_put(_params(factors), parallel.replicated(mesh))
        host = rl_batch.assemble_batch(
            _sequences(8), np.asarray(advantages, np.float32), chunk=rl.logprob_chunk, rows=8
        )
        batch = rl_batch.place_batch(host, mesh)
        state = rl_loss.init_state(params, rl)
        options = rl_loss.LossOptions.from_config(ADAPTER, SVF, rl)
        state, metrics = rl_loss.train_step(CONFIG, options, rl, state, weights, factors, batch, 2)
        results.append((state, metrics, weights, batch))

    (sharded, sharded_metrics, weights, batch), (single, single_metrics, _, _) = results
    assert len(weights.embed.sharding.device_set) == 8  # really spread over the mesh
    assert not weights.embed.sharding.is_fully_replicated
    assert len(batch.tokens.sharding.device_set) == 8
    for key in single.params:
        np.testing.assert_allclose(sharded.params[key], single.params[key], rtol=1e-5, atol=1e-6)
    for name, value in single_metrics.items():
        np.testing.assert_allclose(sharded_metrics[name], value, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Host side.


def test_advantages():
    rewards = np.asarray([1.0, -1.0, -1.0, -1.0, 1.0, 1.0])
    np.testing.assert_array_equal(rl_batch.compute_advantages(rewards, 3, "none"), rewards)
    normalized = rl_batch.compute_advantages(rewards, 3, "normalize")
    assert abs(normalized.mean()) < 1e-6 and abs(normalized.std() - 1.0) < 1e-4
    loo = rl_batch.compute_advantages(rewards, 3, "leave_one_out")
    np.testing.assert_allclose(loo, [2.0, -1.0, -1.0, -2.0, 1.0, 1.0])


def test_rewards_can_deny_credit_to_fallback_guesses():
    scores = [
        Score(True, "B", "answer B, gold B"),
        Score(True, None, "no letter found; seeded guess A, gold A"),
        Score(False, "C", "answer C, gold D"),
    ]
    assert [reward_of(score) for score in scores] == [1.0, 1.0, -1.0]
    assert [reward_of(score, -0.1, True) for score in scores] == [1.0, -0.1, -0.1]


def test_batch_schedule_is_the_official_draw_without_replacement():
    schedule = rl_batch.batch_schedule(50, 8, 4, seed=42)
    rng = np.random.RandomState(42)
    for row in schedule:
        np.testing.assert_array_equal(row, rng.choice(50, 8, replace=False))
        assert len(set(row.tolist())) == 8
    assert rl_batch.batch_schedule(5, 8, 2, seed=42).shape == (2, 5)  # capped at the data


def test_completion_tokens_retokenized_or_sampled_exclude_stop_text():
    tokenizer = tiny.tiny_tokenizer()
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    completion = "The answer is 4."
    # Stop strings are checked between decode chunks, so sampled ids run past the stop string.
    sampled = tokenizer.encode(completion + " Response: more", add_special_tokens=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)

    retokenized, start = rl_batch.sequence_tokens(
        tokenizer, prompt, completion, sampled, "retokenize"
    )
    exact, exact_start = rl_batch.sequence_tokens(tokenizer, prompt, completion, sampled, "sampled")

    assert start == exact_start == len(prompt_ids)
    assert retokenized == tokenizer.encode(prompt + completion, add_special_tokens=False)
    assert tokenizer.decode(exact[start:]) == completion
    assert exact == prompt_ids + sampled[: len(exact) - start]


def test_batch_layout_masks_only_completion_tokens():
    sequences = [([5, 6, 7, 8, 9], 3), ([1, 2], 1)]
    batch = rl_batch.assemble_batch(sequences, np.asarray([1.0, -1.0]), chunk=4, rows=4)

    assert batch.tokens.shape == (4, 8)  # 5 tokens -> 2 chunks of 4 -> power of two
    np.testing.assert_array_equal(batch.tokens[0, 3:], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(batch.completion_mask[0], [0, 0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(batch.completion_mask[1], [0, 0, 0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(batch.row_mask, [True, True, False, False])
    np.testing.assert_array_equal(batch.advantages, [1.0, -1.0, 0.0, 0.0])
    assert batch.scored_tail == 4  # the longest completion (2) + the position before it, chunked
    lengths = [padding.chunked_length(n, 4) for n in (1, 4, 5, 9, 12, 13, 17, 25, 33, 49)]
    assert lengths == [4, 4, 8, 12, 12, 16, 24, 32, 48, 64]
    assert rl_batch.microbatch_layout(10, 3, 2) == (12, 3)  # microbatches of 4 rows
    assert rl_batch.microbatch_layout(10, None, 8) == (16, 1)


@pytest.mark.parametrize("optimizer", ["adam", "adamw_cosine"])
def test_optimizers(optimizer):
    rl = RLConfig(lr=0.1, max_grad_norm=1e-3, optimizer=optimizer, num_iters=10, weight_decay=0.0)
    params = {"mlp.up_proj": jnp.zeros((2, 3))}
    grads = {"mlp.up_proj": jnp.full((2, 3), 5.0)}
    transform = rl_loss.make_optimizer(rl)
    opt_state = transform.init(params)
    sizes = []
    for _ in range(rl.num_iters):
        updates, opt_state = transform.update(grads, opt_state, params)
        sizes.append(float(optax.tree.norm(updates)) / np.sqrt(6))
    # Adam's normalized step is lr whatever the clipping; the cosine schedule decays it to 0.
    if optimizer == "adam":
        np.testing.assert_allclose(sizes, 0.1, rtol=1e-3)
    else:
        assert sizes[0] == pytest.approx(0.1, rel=1e-3) and sizes[-1] < 0.01


def _compiled_gradient(stacked: bool, remat: bool):
    """The compiled gradient of a 4-row batch's loss, its parameters and their layout."""
    weights, factors = _frozen(stacked=stacked)
    params = _params(factors)
    batch, _ = _batch([1.0, -1.0, 0.5, -0.25], rows=4)
    options = rl_loss.LossOptions.from_config(ADAPTER, SVF, dataclasses.replace(RL, remat=remat))

    def loss(params):
        return rl_loss.microbatch_loss(
            params, CONFIG, options, weights, factors, batch, jnp.asarray(4.0)
        )[0]

    return jax.jit(jax.grad(loss)).lower(params).compile(), params


@pytest.mark.parametrize("stacked", [False, True], ids=["unrolled", "scan"])
def test_remat_keeps_the_gradient_and_lowers_its_memory(stacked):
    (plain, params), (remat, _) = (_compiled_gradient(stacked, remat) for remat in (False, True))
    plain_grads, remat_grads = plain(params), remat(params)
    for key in params:
        np.testing.assert_allclose(remat_grads[key], plain_grads[key], rtol=1e-4, atol=1e-6)
    plain_bytes = plain.memory_analysis().temp_size_in_bytes
    assert remat.memory_analysis().temp_size_in_bytes < plain_bytes


def test_remat_scans_the_layers_whatever_their_layout():
    """Unrolled, XLA:CPU recomputes every layer early and keeps their activations, so remat
    scans over the stacked layers: both layouts compile to the same gradient."""
    (unrolled, params), (scanned, _) = (
        _compiled_gradient(stacked, True) for stacked in (False, True)
    )
    np.testing.assert_allclose(
        jax.tree.leaves(unrolled(params)), jax.tree.leaves(scanned(params)), rtol=1e-5, atol=1e-7
    )
    memory = [compiled.memory_analysis().temp_size_in_bytes for compiled in (unrolled, scanned)]
    assert memory[0] == memory[1]


@pytest.mark.torch
def test_next_token_loss_and_gradient_match_transformers_loss(tmp_path):
    """With z = 1 (W'(1) = W) the next-token loss of a left-padded batch is transformers'
    `loss` with labels -100 off the completions, and its gradient w.r.t. z matches finite
    differences of that loss through the merged weights."""
    torch = pytest.importorskip("torch")
    import transformers

    tensors = svf_tiny.save_hf_dir(tmp_path / "model", seed=4)
    weights = loading.weights_from_hf(CONFIG, tensors, skip=lambda key: key in TARGETS)
    factors = svf_tiny.factors(tensors, svf_cache.fingerprint(CONFIG, tensors), TARGETS)
    plain = svf_lib.Parametrization("plain")
    shapes = {key: (factors.num_layers, rank) for key, rank in factors.ranks().items()}
    ones = jax.tree.map(jnp.ones_like, svf_lib.init_params(jax.random.key(0), shapes))
    batch, _ = _batch(np.full(5, 7.0), seed=3)  # advantages must not matter
    options = rl_loss.LossOptions(
        objective="next_token", parametrization=plain, logprob_chunk=RL.logprob_chunk
    )
    grads, metrics = rl_loss.compute_gradients(CONFIG, options, ones, weights, factors, batch, 2)

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "model"), dtype=torch.float32
    ).eval()
    mask = np.asarray(batch.token_mask) & np.asarray(batch.row_mask)[:, None]
    labels = np.where(np.asarray(batch.completion_mask) & mask, np.asarray(batch.tokens), -100)

    def transformers_loss(model) -> float:
        with torch.no_grad():
            return model(
                input_ids=torch.tensor(np.asarray(batch.tokens), dtype=torch.long),
                attention_mask=torch.tensor(mask.astype(np.int64)),
                position_ids=torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0)),
                labels=torch.tensor(labels, dtype=torch.long),
            ).loss.item()

    reference = transformers_loss(torch_model)
    print(f"next-token loss {float(metrics['loss']):.6f} vs transformers {reference:.6f}")
    assert float(metrics["loss"]) == pytest.approx(reference, abs=1e-5)

    # d loss / d z of one singular value, by central differences through transformers.
    key, layer, index, step = TARGETS[0], 1, 0, 1e-2
    factor = factors.layers[layer][key]
    a, s, b = (np.asarray(x, np.float64) for x in (factor.a, factor.s, factor.b))
    weight_name = f"model.layers.{layer}.{key}.weight"

    def loss_at(scale: float) -> float:
        z = np.ones_like(s)
        z[index] = scale
        kernel = (a * (s * z)) @ b * (s.sum() / (s * z).sum())  # [in, out], nuclear rescale
        with torch.no_grad():
            torch_model.get_parameter(weight_name).copy_(
                torch.tensor(kernel.T, dtype=torch.float32)
            )
        return transformers_loss(torch_model)

    finite = (loss_at(1 + step) - loss_at(1 - step)) / (2 * step)
    print(f"d loss / d z: {float(grads[key][layer, index]):.6f} vs finite differences {finite:.6f}")
    assert float(grads[key][layer, index]) == pytest.approx(finite, rel=2e-2, abs=1e-4)


def test_next_token_objective_ignores_advantages(frozen):
    params = _params(frozen[1])
    options = rl_loss.LossOptions(objective="next_token", logprob_chunk=RL.logprob_chunk)
    weights, factors = frozen
    losses = [
        rl_loss.compute_gradients(CONFIG, options, params, weights, factors, _batch(adv)[0])[1]
        for adv in (np.ones(4), np.array([3.0, -1.0, 0.0, 2.0]))
    ]
    assert float(losses[0]["loss"]) == pytest.approx(float(losses[1]["loss"]), rel=1e-6)
    assert float(losses[0]["loss"]) > 0
    with pytest.raises(ValueError, match="unknown objective"):
        rl_loss.LossOptions(objective="sft")

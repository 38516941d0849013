"""The cross-entropy method: convergence, clamping, the re-evaluated incumbent, the log-likelihood
tie-break, the elite statistics, jit/vmap, determinism, and the optional evosax interop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2jax.adaptation import cem as cem_lib

TARGET = jnp.asarray([0.2, 0.9, 0.55, 0.05])


def quadratic_fitness(population):
    """-||x - TARGET||^2 per member of a {"alpha": [P, 4]} population (maximized at TARGET)."""
    return -jnp.sum((population["alpha"] - TARGET) ** 2, axis=-1)  # [P]


def run(strategy, params, key, generations, fitness_fn=quadratic_fitness):
    state = strategy.init(key, {"alpha": jnp.full((4,), 0.5)}, params)
    for generation in range(generations):
        ask_key, tell_key = jax.random.split(jax.random.fold_in(key, generation))
        population, state = strategy.ask(ask_key, state, params)
        state, _ = strategy.tell(tell_key, population, fitness_fn(population), state, params)
    return state


def template():
    return {"alpha": jnp.zeros((4,))}


def test_official_settings():
    cem = cem_lib.CEM(32, template())
    params = cem.default_params
    assert (cem.num_elites, cem.num_dims) == (6, 4)  # int(32 * 0.2) = int(6.4)
    assert (params.std_init, params.clip_min, params.clip_max) == (0.5, 0.0, 1.0)
    with pytest.raises(cem_lib.CEMError, match="1 elites"):
        cem_lib.CEM(8, template(), elite_ratio=0.2)


def test_converges_on_a_toy_quadratic():
    cem = cem_lib.CEM(32, template())
    state = run(cem, cem.default_params, jax.random.key(0), generations=40)
    best = cem.get_best(state)["alpha"]
    np.testing.assert_allclose(best, TARGET, atol=0.02)
    np.testing.assert_allclose(cem.get_mean(state)["alpha"], TARGET, atol=0.02)
    assert float(state.best_fitness) > -1e-3
    assert int(state.generation_counter) == 40


def test_samples_are_clamped_to_the_bounds():
    cem = cem_lib.CEM(32, template())
    params = cem.default_params.replace(std_init=5.0, clip_min=0.25, clip_max=0.75)
    state = cem.init(jax.random.key(0), {"alpha": jnp.full((4,), 3.0)}, params)
    population, _ = cem.ask(jax.random.key(1), state, params)
    values = np.asarray(population["alpha"])
    assert values.min() == 0.25 and values.max() == 0.75  # both bounds are hit, never crossed
    np.testing.assert_array_equal(np.asarray(state.mean), 0.75)  # the start is clamped too


def test_member_zero_re_evaluates_the_incumbent():
    cem = cem_lib.CEM(32, template())
    params = cem.default_params
    state = cem.init(jax.random.key(0), {"alpha": jnp.full((4,), 0.25)}, params)
    population, state = cem.ask(jax.random.key(1), state, params)
    np.testing.assert_array_equal(population["alpha"][0], 0.25)  # the initial mean goes first

    fitness = jnp.zeros(32).at[7].set(1.0)
    state, metrics = cem.tell(jax.random.key(2), population, fitness, state, params)
    assert int(metrics["best_index"]) == 7
    population, state = cem.ask(jax.random.key(3), state, params)
    np.testing.assert_array_equal(population["alpha"][0], state.best_solution)

    # Re-evaluated lower this time (member 0 scores 0.5): the generation's best replaces it.
    fitness = jnp.zeros(32).at[0].set(0.5).at[3].set(0.6)
    state, _ = cem.tell(jax.random.key(4), population, fitness, state, params)
    assert float(state.best_fitness) == pytest.approx(0.6)
    np.testing.assert_array_equal(state.best_solution, population["alpha"][3])


def test_without_re_evaluation_the_incumbent_keeps_its_score():
    cem = cem_lib.CEM(32, template(), re_eval_best=False)
    params = cem.default_params
    state = cem.init(jax.random.key(0), {"alpha": jnp.full((4,), 0.25)}, params)
    population, state = cem.ask(jax.random.key(1), state, params)
    assert not np.allclose(population["alpha"][0], 0.25)
    state, _ = cem.tell(jax.random.key(2), population, jnp.zeros(32).at[5].set(0.9), state, params)
    population, state = cem.ask(jax.random.key(3), state, params)
    state, metrics = cem.tell(jax.random.key(4), population, jnp.full(32, 0.1), state, params)
    assert int(metrics["best_index"]) == 32  # the incumbent (stored 0.9) beats every 0.1
    assert float(state.best_fitness) == pytest.approx(0.9)


def test_tie_break_picks_the_higher_log_likelihood_among_equal_accuracies():
    cem = cem_lib.CEM(32, template())
    params = cem.default_params
    state = cem.init(jax.random.key(0), template(), params)
    population, state = cem.ask(jax.random.key(1), state, params)
    accuracy = jnp.full(32, 0.3).at[jnp.asarray([4, 9, 20])].set(0.7)
    loglik = jnp.full(32, -0.1).at[4].set(-2.0).at[9].set(-0.5).at[20].set(-1.0)
    loglik = loglik.at[11].set(jnp.nan)

    state, metrics = cem.tell(jax.random.key(2), population, accuracy, state, params, loglik)

    # Member 9 wins the tie; the members at -0.1 have a lower accuracy and never win.
    assert int(metrics["best_index"]) == 9
    np.testing.assert_array_equal(state.best_solution, population["alpha"][9])
    assert float(state.best_tie_break) == pytest.approx(-0.5)
    _, untied = cem.tell(jax.random.key(2), population, accuracy, state, params)
    assert int(untied["best_index"]) == 4  # without a tie-break, the lowest index


def test_elites_by_fitness_alone_give_the_mean_and_the_unbiased_std():
    cem = cem_lib.CEM(32, template())
    params = cem.default_params
    state = cem.init(jax.random.key(0), template(), params)
    population, state = cem.ask(jax.random.key(1), state, params)
    fitness = jnp.arange(32.0)
    tie_break = -jnp.arange(32.0)  # must not change which members are elites

    state, metrics = cem.tell(jax.random.key(2), population, fitness, state, params, tie_break)

    elites = np.asarray(population["alpha"])[26:]  # the 6 fittest
    np.testing.assert_allclose(state.mean, elites.mean(0), rtol=1e-6)
    np.testing.assert_allclose(state.std, elites.std(0, ddof=1), rtol=1e-5)
    assert float(metrics["elite_mean_fitness"]) == pytest.approx(28.5)


def test_nan_fitness_counts_as_failed():
    cem = cem_lib.CEM(8, template(), elite_ratio=0.25)
    params = cem.default_params
    state = cem.init(jax.random.key(0), template(), params)
    population, state = cem.ask(jax.random.key(1), state, params)
    fitness = jnp.full(8, jnp.nan).at[2].set(-5.0).at[6].set(-4.0)
    state, metrics = cem.tell(jax.random.key(2), population, fitness, state, params)
    assert int(metrics["best_index"]) == 6
    np.testing.assert_allclose(state.mean, np.asarray(population["alpha"])[[6, 2]].mean(0))


def test_same_key_same_result_and_another_key_differs():
    cem = cem_lib.CEM(16, template(), elite_ratio=0.25)
    params = cem.default_params
    first = run(cem, params, jax.random.key(3), generations=3)
    second = run(cem, params, jax.random.key(3), generations=3)
    other = run(cem, params, jax.random.key(4), generations=3)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.mean, other.mean)


def test_whole_generations_jit_and_vmap_over_keys():
    cem = cem_lib.CEM(16, template(), elite_ratio=0.25)
    params = cem.default_params

    @jax.jit
    def three_generations(key):
        state = cem.init(key, {"alpha": jnp.full((4,), 0.5)}, params)

        def generation(state, step_key):
            population, state = cem.ask(step_key, state, params)
            state, metrics = cem.tell(
                step_key, population, quadratic_fitness(population), state, params
            )
            return state, metrics["best_fitness"]

        return jax.lax.scan(generation, state, jax.random.split(key, 3))

    keys = jax.random.split(jax.random.key(7), 4)
    states, best = jax.vmap(three_generations)(keys)
    assert states.mean.shape == (4, 4) and best.shape == (4, 3)
    single_state, single_best = three_generations(keys[2])
    np.testing.assert_allclose(states.mean[2], single_state.mean, rtol=1e-6)
    np.testing.assert_allclose(best[2], single_best, rtol=1e-6)
    assert np.all(np.diff(np.asarray(best), axis=1) >= 0)  # elitist: never gets worse


def test_params_are_traced_not_static():
    cem = cem_lib.CEM(16, template(), elite_ratio=0.25)
    state = cem.init(jax.random.key(0), template(), cem.default_params)
    cem.ask(jax.random.key(1), state, cem.default_params)
    before = cem.ask._cache_size()
    cem.ask(jax.random.key(1), state, cem.default_params.replace(clip_max=0.3))
    assert cem.ask._cache_size() == before


def test_evosax_simple_es_mean_update_matches_cem_without_clamping():
    pytest.importorskip("evosax")
    unbounded = dict(clip_min=-jnp.inf, clip_max=jnp.inf)
    strategy, es_params = cem_lib.simple_es(32, template())
    strategy.clip_min, strategy.clip_max = unbounded["clip_min"], unbounded["clip_max"]
    cem = cem_lib.CEM(32, template(), re_eval_best=False)
    cem_params = cem.default_params.replace(**unbounded)
    mean = {"alpha": jnp.full((4,), 0.4)}
    es_state = strategy.init(jax.random.key(0), mean, es_params)
    cem_state = cem.init(jax.random.key(0), mean, cem_params)
    population, es_state = strategy.ask(jax.random.key(1), es_state, es_params)
    fitness = quadratic_fitness(population)

    es_state, _ = strategy.tell(jax.random.key(2), population, fitness, es_state, es_params)
    cem_state, _ = cem.tell(jax.random.key(2), population, fitness, cem_state, cem_params)

    np.testing.assert_allclose(es_state.mean, cem_state.mean, rtol=1e-5)
    np.testing.assert_allclose(
        strategy.get_best(es_state)["alpha"], cem.get_best(cem_state)["alpha"]
    )


def test_evosax_strategy_clamps_and_converges():
    pytest.importorskip("evosax")
    strategy, params = cem_lib.simple_es(32, template())
    population, _ = strategy.ask(
        jax.random.key(1), strategy.init(jax.random.key(0), template(), params), params
    )
    values = np.asarray(population["alpha"])
    assert values.min() >= 0.0 and values.max() <= 1.0
    state = run(strategy, params, jax.random.key(0), generations=40)
    np.testing.assert_allclose(strategy.get_best(state)["alpha"], TARGET, atol=0.05)

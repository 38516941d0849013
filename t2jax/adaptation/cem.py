"""The cross-entropy method (CEM) of Transformer²'s few-shot strategy, with evosax's ask/tell API
(spec section 4.4; anchors-style sections 2.7 and 6.8).

    cem = CEM(population_size=32, solution=alpha_template)      # alpha: [K] or [K, M]
    params = cem.default_params                                  # std 0.5, clamp to [0, 1]
    state = cem.init(key, mean, params)
    population, state = cem.ask(key_ask, state, params)          # pytree, [32, ...] leaves
    state, metrics = cem.tell(key_tell, population, fitness, state, params, tie_break=loglik)
    best = cem.get_best(state)

The official `CEM` (`optim_modules.py:213-593`, `cfgs/optimization/cem.yaml`): each generation
samples N(mean, diag(std^2)) and clamps to [clip_min, clip_max]; member 0 re-evaluates the current
best solution; the elites are the top `int(population_size * elite_ratio)` members by fitness alone
(6 of 32); the new mean is their mean and the new std their *unbiased* std (`torch.std`), with no
smoothing. The best solution is the fittest member of the generation, ties broken by a secondary
score (the official mean log-likelihood of the correct answers); because member 0 carries the
incumbent, the search is elitist.

Sign convention: fitness is *maximized* (T² maximizes few-shot accuracy). evosax minimizes;
`EvosaxStrategy` wraps any evosax distribution-based algorithm (e.g. `SimpleES`) behind this
interface (it negates fitness and clamps), so evosax is optional.

Solutions are arbitrary pytrees, ravelled to one vector of D dimensions with
`jax.flatten_util.ravel_pytree`. `init`, `ask` and `tell` are pure and jitted with `self` static;
the state and params are `flax.struct` dataclasses, so the whole loop can be vmapped over keys.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import struct
from jax import flatten_util

Array = jax.Array
Solution = Any  # a pytree of arrays
Population = Any  # the same pytree with a leading population axis on every leaf


class CEMError(ValueError):
    """Settings that make the cross-entropy method ill-defined."""


@struct.dataclass
class CEMParams:
    """Per-run settings (arrays or floats: changing them never recompiles).

    Attributes:
        std_init: initial std per dimension; the official (clip_max - clip_min) / 2 = 0.5.
        std_min: floor on the std after each update (0 = none, as in the official code).
        clip_min: lower bound of every sampled dimension.
        clip_max: upper bound of every sampled dimension.
    """

    std_init: float | Array = 0.5
    std_min: float | Array = 0.0
    clip_min: float | Array = 0.0
    clip_max: float | Array = 1.0


@struct.dataclass
class CEMState:
    """Search distribution and incumbent, with solutions ravelled to D dimensions."""

    mean: Array  # [D]
    std: Array  # [D]
    best_solution: Array  # [D]
    best_fitness: Array  # []
    best_tie_break: Array  # []
    generation_counter: Array  # [] int32


class Strategy(Protocol):
    """What the few-shot loop needs of a population-based optimizer (maximizing)."""

    population_size: int

    @property
    def default_params(self) -> Any: ...

    def init(self, key: Array, mean: Solution, params: Any) -> Any: ...

    def ask(self, key: Array, state: Any, params: Any) -> tuple[Population, Any]: ...

    def tell(
        self,
        key: Array,
        population: Population,
        fitness: Array,
        state: Any,
        params: Any,
        tie_break: Array | None = None,
    ) -> tuple[Any, dict[str, Array]]: ...

    def get_best(self, state: Any) -> Solution: ...


def lexicographic_argmax(primary: Array, secondary: Array) -> Array:
    """Index of the largest `primary` [P], ties broken by the largest `secondary` [P] (then by the
    lowest index). NaN counts as the worst value in both."""
    primary = _nan_to_lowest(primary)  # [P]
    secondary = _nan_to_lowest(secondary)  # [P]
    tied = primary == jnp.max(primary)  # [P]
    return jnp.argmax(jnp.where(tied, secondary, -jnp.inf))


def _nan_to_lowest(values: Array) -> Array:
    """NaN and -inf -> the lowest finite float, so masking with -inf still ranks them."""
    values = values.astype(jnp.float32)
    lowest = jnp.finfo(jnp.float32).min
    return jnp.where(jnp.isnan(values), lowest, jnp.maximum(values, lowest))


class CEM:
    """Cross-entropy method over pytree solutions, maximizing fitness (see module docstring).

    Args:
        population_size: members per generation (official 32).
        solution: a template pytree with the shape of one solution (values are ignored).
        elite_ratio: fraction of the population kept as elites, rounded down (official 0.2 -> 6).
        re_eval_best: member 0 of every generation is the incumbent best, re-evaluated (official);
            otherwise the incumbent competes with its stored fitness.

    Raises:
        CEMError: fewer than two elites (the unbiased std needs two) or elites > population.
    """

    def __init__(
        self,
        population_size: int,
        solution: Solution,
        elite_ratio: float = 0.2,
        re_eval_best: bool = True,
    ):
        self.population_size = population_size
        self.elite_ratio = elite_ratio
        self.re_eval_best = re_eval_best
        self.num_elites = int(population_size * elite_ratio)
        if not 2 <= self.num_elites <= population_size:
            raise CEMError(
                f"population {population_size} x elite ratio {elite_ratio} gives "
                f"{self.num_elites} elites; the unbiased elite std needs 2 to {population_size}"
            )
        flat, self._unravel = flatten_util.ravel_pytree(solution)
        self.num_dims = flat.size

    @property
    def default_params(self) -> CEMParams:
        """The official settings: std 0.5, clamping to [0, 1], no std floor."""
        return CEMParams()

    def _ravel(self, solution: Solution) -> Array:
        return flatten_util.ravel_pytree(solution)[0]  # [D]

    @functools.partial(jax.jit, static_argnames=("self",))
    def init(self, key: Array, mean: Solution, params: CEMParams) -> CEMState:
        """The initial distribution: `mean` (clamped), std `params.std_init`; `mean` is also the
        incumbent that member 0 evaluates first. `key` is unused (evosax's signature)."""
        del key
        flat_mean = jnp.clip(self._ravel(mean), params.clip_min, params.clip_max)  # [D]
        return CEMState(
            mean=flat_mean,
            std=jnp.full((self.num_dims,), params.std_init, jnp.float32),  # [D]
            best_solution=flat_mean,
            best_fitness=jnp.asarray(-jnp.inf, jnp.float32),
            best_tie_break=jnp.asarray(-jnp.inf, jnp.float32),
            generation_counter=jnp.zeros((), jnp.int32),
        )

    @functools.partial(jax.jit, static_argnames=("self",))
    def ask(self, key: Array, state: CEMState, params: CEMParams) -> tuple[Population, CEMState]:
        """Samples a generation: N(mean, std^2) clamped to the bounds, member 0 = incumbent.

        Returns:
            (population pytree with a leading [P] axis, unchanged state).
        """
        noise = jax.random.normal(key, (self.population_size, self.num_dims))  # [P, D]
        flat = state.mean + state.std * noise  # [P, D]
        flat = jnp.clip(flat, params.clip_min, params.clip_max)  # [P, D]
        if self.re_eval_best:
            flat = flat.at[0].set(state.best_solution)  # [P, D]
        return jax.vmap(self._unravel)(flat), state

    @functools.partial(jax.jit, static_argnames=("self",))
    def tell(
        self,
        key: Array,
        population: Population,
        fitness: Array,
        state: CEMState,
        params: CEMParams,
        tie_break: Array | None = None,
    ) -> tuple[CEMState, dict[str, Array]]:
        """Updates the distribution from a scored generation.

        Args:
            key: unused (evosax's signature).
            population: the generation from `ask` (possibly modified), [P] leading axis.
            fitness: [P], larger is better; NaN marks a failed evaluation.
            state: the state `ask` returned.
            params: run settings.
            tie_break: [P] secondary score deciding the best among equal fitness (the official
                mean log-likelihood); it does not affect the elites. None: lowest index wins.

        Returns:
            (new state, metrics: best_fitness, best_index, generation_max_fitness,
            generation_mean_fitness, elite_mean_fitness, std_mean).
        """
        del key
        flat = jax.vmap(self._ravel)(population)  # [P, D]
        raw_fitness, fitness = fitness, _nan_to_lowest(fitness)  # [P], [P]
        tie_break = jnp.zeros_like(fitness) if tie_break is None else tie_break  # [P]
        elite_fitness, elite_index = jax.lax.top_k(fitness, self.num_elites)  # [E], [E]
        elites = flat[elite_index]  # [E, D]
        mean = jnp.mean(elites, axis=0)  # [D]
        std = jnp.maximum(jnp.std(elites, axis=0, ddof=1), params.std_min)  # [D]
        best_solution, best_fitness, best_tie, best_index = self._best(
            flat, fitness, tie_break, state
        )
        new_state = state.replace(
            mean=mean,
            std=std,
            best_solution=best_solution,
            best_fitness=best_fitness,
            best_tie_break=best_tie,
            generation_counter=state.generation_counter + 1,
        )
        metrics = {
            "best_fitness": best_fitness,
            "best_index": best_index,
            "generation_max_fitness": jnp.nanmax(raw_fitness),
            "generation_mean_fitness": jnp.nanmean(raw_fitness),
            "elite_mean_fitness": jnp.mean(elite_fitness),
            "std_mean": jnp.mean(std),
        }
        return new_state, metrics

    def _best(
        self, flat: Array, fitness: Array, tie_break: Array, state: CEMState
    ) -> tuple[Array, Array, Array, Array]:
        """The generation's best member (re_eval_best), or the best of it and the incumbent.
        Returns (solution [D], fitness, tie-break, index; index P = the incumbent)."""
        if not self.re_eval_best:
            flat = jnp.concatenate([flat, state.best_solution[None]])  # [P + 1, D]
            fitness = jnp.append(fitness, state.best_fitness)  # [P + 1]
            tie_break = jnp.append(tie_break, state.best_tie_break)  # [P + 1]
        index = lexicographic_argmax(fitness, tie_break)
        return flat[index], fitness[index], _nan_to_lowest(tie_break)[index], index

    def get_mean(self, state: CEMState) -> Solution:
        """The distribution mean as a solution pytree."""
        return self._unravel(state.mean)

    def get_best(self, state: CEMState) -> Solution:
        """The incumbent best solution as a pytree."""
        return self._unravel(state.best_solution)


class EvosaxStrategy:
    """An evosax distribution-based algorithm behind the `CEM` interface: samples are clamped to
    [clip_min, clip_max] (and told clamped), fitness is negated for evosax's minimization, and the
    tie-break is folded in as `fitness + tie_break_weight * tie_break` (evosax has no tie-break).

    Args:
        algorithm: e.g. `evosax.algorithms.SimpleES(population_size=32, solution=alpha)`.
        clip_min: lower bound of every dimension.
        clip_max: upper bound of every dimension.
        tie_break_weight: weight of the tie-break score (small enough not to reorder fitness).
    """

    def __init__(
        self,
        algorithm: Any,
        clip_min: float = 0.0,
        clip_max: float = 1.0,
        tie_break_weight: float = 1e-6,
    ):
        self.algorithm = algorithm
        self.population_size = algorithm.population_size
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.tie_break_weight = tie_break_weight

    @property
    def default_params(self) -> Any:
        """The wrapped algorithm's default params."""
        return self.algorithm.default_params

    def init(self, key: Array, mean: Solution, params: Any) -> Any:
        """Initializes the wrapped algorithm at `mean`."""
        return self.algorithm.init(key, mean, params)

    def ask(self, key: Array, state: Any, params: Any) -> tuple[Population, Any]:
        """The wrapped algorithm's samples, clamped to the bounds."""
        population, state = self.algorithm.ask(key, state, params)
        clamp = functools.partial(jnp.clip, min=self.clip_min, max=self.clip_max)
        return jax.tree.map(clamp, population), state

    def tell(
        self,
        key: Array,
        population: Population,
        fitness: Array,
        state: Any,
        params: Any,
        tie_break: Array | None = None,
    ) -> tuple[Any, dict[str, Array]]:
        """Tells the wrapped algorithm the negated (tie-broken) fitness; metrics as for `CEM`."""
        score = _nan_to_lowest(fitness)  # [P]
        if tie_break is not None:
            score = score + self.tie_break_weight * _nan_to_lowest(tie_break)  # [P]
        state, evosax_metrics = self.algorithm.tell(key, population, -score, state, params)
        metrics = {
            "best_fitness": -state.best_fitness,
            "best_index": jnp.argmax(score),
            "generation_max_fitness": jnp.nanmax(fitness),
            "generation_mean_fitness": jnp.nanmean(fitness),
            "std_mean": jnp.mean(state.std),
            "evosax": evosax_metrics,
        }
        return state, metrics

    def get_best(self, state: Any) -> Solution:
        """The wrapped algorithm's best solution so far, as a pytree."""
        unravel = flatten_util.ravel_pytree(self.algorithm.solution)[1]
        return unravel(state.best_solution)


def simple_es(
    population_size: int,
    solution: Solution,
    *,
    elite_ratio: float = 0.2,
    std_init: float = 0.5,
    c_std: float = 1.0,
) -> tuple[EvosaxStrategy, Any]:
    """evosax's `SimpleES` configured as CEM-like as it gets (elite-truncated uniform weights; with
    `c_std=1` the std is the elites' biased spread around the *previous* mean), wrapped.

    Returns:
        (strategy, params).

    Raises:
        CEMError: evosax is not installed (`pip install t2jax[evosax]`).
    """
    try:
        from evosax.algorithms import SimpleES
    except ImportError:
        raise CEMError("the SimpleES strategy needs evosax: pip install 't2jax[evosax]'") from None
    algorithm = SimpleES(population_size=population_size, solution=solution)
    algorithm.elite_ratio = elite_ratio
    params = algorithm.default_params.replace(std_init=std_init, c_std=c_std)
    return EvosaxStrategy(algorithm), params

"""Strategy C (spec 4.4; paper section 3.2): CEM over mixing coefficients alpha ([K] global or
[K, #matrices]) of z' = sum_k alpha_k v_k (v = z by default, raw p as in the official code); the
fitness of a candidate is its accuracy on a few shots of the task, ties broken by the
log-likelihood of its correct answers. The shots follow the official seeds and the other items
are the ones reported.

One CEM generation (P candidates x N shots) is one sampler call with one candidate's z per row
(`score_population`); the official code reloads vLLM weights once per candidate.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from t2jax import adapted as adapted_lib
from t2jax.adaptation import cem as cem_lib
from t2jax.adaptation.config import AdaptError, FewShotConfig
from t2jax.adaptation.expert_model import ExpertModel
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib
from t2jax.tasks import Example, Task, seeded_shuffle_split

Array = jax.Array
# Seeds of the official few-shot shuffles (`cfgs/task/few_shot_*.yaml`, spec 4.4).
FEW_SHOT_SEEDS = {"math": 27, "humaneval": 16, "arc_challenge": 38}


def few_shot_split(
    task_name: str, count: int, shots: int, seed: int | None = None
) -> tuple[list[int], list[int]]:
    """The official shots / reported items split: shuffle `range(count)` with the task's seed
    (MATH 27, HumanEval 16, ARC-Challenge 38) and take the first `shots` indices.

    Raises:
        AdaptError: no official seed for the task and none given, or too few items.
    """
    seed = FEW_SHOT_SEEDS.get(task_name) if seed is None else seed
    if seed is None:
        raise AdaptError(f"no official few-shot seed for {task_name!r}; pass a seed")
    if shots >= count:
        raise AdaptError(f"{shots} shots leave nothing to report out of {count} items")
    return seeded_shuffle_split(count, shots, seed)


def split_items(
    task_name: str, items: Sequence[Example], config: FewShotConfig
) -> tuple[list[Example], list[Example]]:
    """(shots, reported items) of a task's evaluation split: the few-shot split with
    `config.split_seed` or the task's official seed; without either, no shots and every item."""
    seed = FEW_SHOT_SEEDS.get(task_name) if config.split_seed is None else config.split_seed
    if seed is None:
        return [], list(items)
    shot_indices, rest = few_shot_split(task_name, len(items), config.shots, seed)
    return [items[i] for i in shot_indices], [items[i] for i in rest]


def mixing_basis(model: ExpertModel, space: experts_lib.MixSpace) -> dict[str, Array]:
    """The experts' vectors to mix, {key: [K, L, R]}: z, or raw parameters p (space "p")."""
    if space == "z":
        vectors = [model.expert_z[name] for name in model.experts]
    else:
        vectors = [
            {key: jnp.asarray(p) for key, p in expert.params.items()}
            for expert in model.experts.values()
        ]
    return svf_lib.stack_experts(vectors)  # {key: [K, L, R]}


def initial_alpha(model: ExpertModel, shape: str) -> Array:
    """alpha = 1/K everywhere: [K] ("global") or [K, L * #targets] ("per_matrix")."""
    num_experts = len(model.experts)
    if shape == "global":
        return jnp.full((num_experts,), 1.0 / num_experts)  # [K]
    matrices = model.adapted.factors.num_layers * len(model.adapted.targets)
    return jnp.full((num_experts, matrices), 1.0 / num_experts)  # [K, M]


@functools.partial(jax.jit, static_argnames=("normalize", "order"))
def mix_population(
    basis: Mapping[str, Array], alphas: Array, normalize: bool, order: tuple[str, ...]
) -> dict[str, Array]:
    """z' of every candidate: basis {key: [K, L, R]} and alphas [P, K] or [P, K, M] give
    {key: [P, L, R]}. `order` is the targets' order within a layer (see `svf.mix`)."""
    return jax.vmap(lambda alpha: svf_lib.mix(basis, alpha, normalize=normalize, order=order))(
        alphas
    )


@dataclasses.dataclass(frozen=True)
class PopulationScores:
    """One generation's scores.

    Attributes:
        accuracy: [P] fraction of shots answered correctly.
        loglik: [P] mean per-token log-likelihood of the correct answers, averaged over them
            (0.0 without any); NaN where it cannot change the choice of the best (not tied at
            the top, or the tie-break is off).
        correct: [P, N].
        texts: [P][N] completions.
    """

    accuracy: np.ndarray
    loglik: np.ndarray
    correct: np.ndarray
    texts: list[list[str]]


def score_population(
    model: ExpertModel,
    task: Task,
    shots: Sequence[Example],
    shot_prompts: Sequence[str],
    z_population: Mapping[str, Array],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    tie_break: bool = True,
    rows_per_call: int | None = None,
    per_candidate: bool = False,
    logprob_rows_per_call: int = 16,
) -> PopulationScores:
    """Scores P candidates on N shots: all P x N rows in one sampler call (candidate-major, one
    candidate's z per row), then one teacher-forced pass over the correct answers of the
    candidates tied at the top accuracy (the official tie-break).

    `per_candidate` instead merges each candidate's W' and generates its N rows alone (the
    official shape, P sampler calls): the same completions, and faster where decoding is
    compute-bound at N rows (a CPU, N >= 3: factored rows cost ~1.3x the MLP FLOPs).

    Args:
        model: the model and its factors.
        task: scores the completions.
        shots: the N examples.
        shot_prompts: their rendered prompts.
        z_population: {key: [P, L, R]} candidates' scales (see `mix_population`).
        max_new_tokens: generation budget.
        stop_strings: generation stop strings.
        tie_break: compute the log-likelihood tie-break.
        rows_per_call: rows per sampler call (None: one call).
        per_candidate: one merged sampler call per candidate (see above).
        logprob_rows_per_call: rows per teacher-forced pass.
    """
    num_candidates = next(iter(z_population.values())).shape[0]
    num_shots = len(shots)
    choices = [{k: v[p] for k, v in z_population.items()} for p in range(num_candidates)]
    row_choice = np.repeat(np.arange(num_candidates), num_shots).tolist()  # [P * N]
    prompt_ids = model.adapted.sampler.encode(shot_prompts)
    settings = dict(max_new_tokens=max_new_tokens, stop_strings=stop_strings)
    if per_candidate:
        generation = adapted_lib.concatenate(
            [model.adapted.generate(prompt_ids, [z], [0] * num_shots, **settings) for z in choices]
        )
    else:
        generation = model.adapted.generate(
            prompt_ids * num_candidates,
            choices,
            row_choice,
            rows_per_call=rows_per_call,
            **settings,
        )
    scores = task.score_batch(list(shots) * num_candidates, generation.texts)
    correct = np.asarray([s.correct for s in scores]).reshape(num_candidates, num_shots)
    accuracy = correct.mean(axis=1)  # [P]
    loglik = np.full(num_candidates, np.nan)
    tied = np.flatnonzero(accuracy == accuracy.max())
    if tie_break and len(tied) > 1:
        loglik[tied] = 0.0  # the official value without correct answers
        rows = [p * num_shots + n for p in tied for n in np.flatnonzero(correct[p])]
        if rows:
            row_logprobs = model.adapted.log_likelihood(
                [prompt_ids[row % num_shots] for row in rows],
                [generation.token_ids[row] for row in rows],
                choices,
                [row_choice[row] for row in rows],
                rows_per_call=logprob_rows_per_call,
            )
            for p in tied:
                mine = [i for i, row in enumerate(rows) if row // num_shots == p]
                loglik[p] = float(np.mean(row_logprobs[mine]))
    texts = [generation.texts[p * num_shots : (p + 1) * num_shots] for p in range(num_candidates)]
    return PopulationScores(accuracy=accuracy, loglik=loglik, correct=correct, texts=texts)


@dataclasses.dataclass(frozen=True)
class FewShotResult:
    """Pass 1 of the few-shot strategy.

    Attributes:
        experts: the expert names, in the order of alpha's first axis.
        alpha: the best coefficients, [K] or [K, M].
        z: the mixed scales of `alpha`, {key: [L, R]}.
        history: per generation: generation, best_fitness, max_accuracy, mean_accuracy, seconds.
    """

    experts: tuple[str, ...]
    alpha: np.ndarray
    z: svf_lib.ZVectors
    history: list[dict[str, float]]


def few_shot_search(
    model: ExpertModel,
    task: Task,
    shots: Sequence[Example],
    shot_prompts: Sequence[str],
    config: FewShotConfig = FewShotConfig(),
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    strategy: cem_lib.Strategy | None = None,
    strategy_params: Any = None,
    progress: bool = False,
) -> FewShotResult:
    """Searches mixing coefficients with CEM (or another ask/tell `strategy`, e.g.
    `cem.simple_es`) to maximize accuracy on the shots.

    Args:
        model: the model and its experts (K = len(model.experts)).
        task: scores the shots.
        shots: the examples to adapt on.
        shot_prompts: their rendered prompts.
        config: search settings.
        max_new_tokens: generation budget per shot.
        stop_strings: generation stop strings.
        strategy: an ask/tell optimizer over alpha (default: the official CEM from `config`).
        strategy_params: its params (default: its defaults, with `config.std_init` for CEM).
        progress: show a progress bar.
    """
    alpha = initial_alpha(model, config.alpha_shape)
    if strategy is None:
        strategy = cem_lib.CEM(config.population_size, alpha, config.elite_ratio)
        strategy_params = strategy.default_params.replace(std_init=config.std_init)
    params = strategy.default_params if strategy_params is None else strategy_params
    basis = mixing_basis(model, config.mix_space)
    order = model.adapted.targets
    key = jax.random.key(config.seed)
    state = strategy.init(key, alpha, params)
    history = []
    bar = tqdm(range(config.generations), desc="CEM", disable=not progress)
    for generation in bar:
        start = time.perf_counter()
        ask_key, tell_key = jax.random.split(jax.random.fold_in(key, generation))
        population, state = strategy.ask(ask_key, state, params)
        z_population = mix_population(basis, population, config.normalize, order)
        scores = score_population(
            model,
            task,
            shots,
            shot_prompts,
            z_population,
            max_new_tokens=max_new_tokens,
            stop_strings=stop_strings,
            tie_break=config.tie_break,
            rows_per_call=config.rows_per_call,
            per_candidate=config.per_candidate,
            logprob_rows_per_call=config.logprob_rows_per_call,
        )
        tie_break = jnp.asarray(scores.loglik, jnp.float32) if config.tie_break else None
        state, metrics = strategy.tell(
            tell_key,
            population,
            jnp.asarray(scores.accuracy, jnp.float32),
            state,
            params,
            tie_break,
        )
        history.append(
            {
                "generation": generation,
                "best_fitness": float(metrics["best_fitness"]),
                "max_accuracy": float(scores.accuracy.max()),
                "mean_accuracy": float(scores.accuracy.mean()),
                "seconds": time.perf_counter() - start,
            }
        )
        bar.set_postfix(best=f"{history[-1]['best_fitness']:.2f}")
    best = strategy.get_best(state)
    z = svf_lib.mix(basis, best, normalize=config.normalize, order=order)  # {key: [L, R]}
    return FewShotResult(experts=tuple(model.experts), alpha=np.asarray(best), z=z, history=history)

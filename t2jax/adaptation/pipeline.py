"""Inference-time self-adaptation: the three strategies of Transformer² and the two-pass pipeline
(spec section 4; paper section 3.2).

Pass 1 decides which expertise each request needs; pass 2 answers with the adapted weights.
  * "prompt" (A, spec 4.1): the base model answers the official classification prompt; the first
    `\\boxed{}` names code / math / reasoning, anything else is "other" and gets the base weights
    (`official_other=True` reproduces the official code, where "other" runs with whatever expert
    was loaded last).
  * "cls" (B, spec 4.3): the same with the classification expert's weights in pass 1 (an expert
    file trained by `t2jax train` on the `cls` task).
  * "fewshot" (C, spec 4.4): CEM over mixing coefficients alpha ([K] global or [K, #matrices]) of
    z' = sum_k alpha_k v_k (v = z by default, raw p as in the official code), fitness = accuracy on
    a few shots of the task with the log-likelihood tie-break; the shots follow the official seeds
    and the other items are the ones reported.

The official code reloads vLLM weights once per predicted category and once per CEM candidate.
Here pass 2 serves a whole batch in one sampler call with one expert per row (factored SVF), and
one CEM generation (32 candidates x N shots) is one sampler call as well. A batch whose rows all
share one expert is merged instead (decoding at the base model's cost).

    model = build_expert_model(load_model("smollm2-135m-instruct"), {"math": ..., "code": ...})
    run = adapt(model, "prompt", examples, prompts, AdaptOptions(max_new_tokens=512))
    records, summary = score_run(run, task)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from t2jax import logprobs, reports
from t2jax import model as model_lib
from t2jax.adaptation import cem as cem_lib
from t2jax.config import ModelConfig
from t2jax.evaluation import standard_error
from t2jax.loading import LoadedModel
from t2jax.padding import bucket_length, left_pad
from t2jax.sampler import Generation, Sampler
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib
from t2jax.svf import factors as svd
from t2jax.tasks import (
    CATEGORIES,
    OFFICIAL_STOP_STRINGS,
    Example,
    Task,
    parse_category,
    render_prompt,
    reward_of,
    seeded_shuffle_split,
)
from t2jax.tasks.cls import (
    CLASSIFICATION_ANSWER,
    DISPATCH_METHODS,
    OTHER,
    ClsTask,
    DispatchMethod,
)

Array = jax.Array
Strategy = Literal["prompt", "cls", "fewshot"]
STRATEGIES = ("prompt", "cls", "fewshot")

CLASSIFIER = "cls"  # route name of the classification expert (official "other" quirk only)
MIXTURE = "mixture"  # route name of the few-shot mixture
# Which expertise each benchmark needs (rows of the dispatch confusion matrix, paper Fig. 6).
CATEGORY_OF_TASK = {
    "math": "math",
    "gsm8k": "math",
    "humaneval": "code",
    "mbpp": "code",
    "arc_challenge": "reasoning",
    "arc_easy": "reasoning",
}
# Seeds of the official few-shot shuffles (`cfgs/task/few_shot_*.yaml`, spec 4.4).
FEW_SHOT_SEEDS = {"math": 27, "humaneval": 16, "arc_challenge": 38}
_CLS_TASK = ClsTask()


class AdaptError(ValueError):
    """Strategies, experts or data that do not fit together."""


# ----------------------------------------------------------------------------------------------
# The model with its experts.


@dataclasses.dataclass(frozen=True)
class ExpertModel:
    """A loaded model with its SVD factors and named SVF experts: what every strategy runs on.

    Attributes:
        config: the architecture.
        weights: the base weights.
        sampler: a sampler over the base weights (its batch padding and sharding are reused).
        factors: SVD factors of the experts' targets.
        experts: expert name -> expert, in the order of the mixing coefficients.
        classifier: the classification expert of strategy "cls", if any.
    """

    config: ModelConfig
    weights: model_lib.Weights
    sampler: Sampler
    factors: svd.ModelFactors
    experts: Mapping[str, experts_lib.Expert]
    classifier: experts_lib.Expert | None = None

    @functools.cached_property
    def expert_z(self) -> dict[str, svf_lib.ZVectors]:
        """Expert name (and "cls" for the classifier) -> its scales z {key: [L, R]}."""
        named = dict(self.experts)
        if self.classifier is not None:
            named[CLASSIFIER] = self.classifier
        return {name: expert.z() for name, expert in named.items()}

    @property
    def targets(self) -> tuple[str, ...]:
        """Adapted module keys, in HF order (the layer-major matrix order of per-matrix alpha)."""
        return self.factors.targets


def build_expert_model(
    loaded: LoadedModel,
    experts: Mapping[str, experts_lib.Expert],
    classifier: experts_lib.Expert | None = None,
    *,
    cache_root: str | None = None,
    progress: bool = True,
) -> ExpertModel:
    """Computes (or reads from the cache) the SVD factors of the experts' targets and checks that
    every expert fits the model.

    Args:
        loaded: the model (`t2jax.loading.load_model`).
        experts: name -> expert (names "code", "math", "reasoning" for dispatch).
        classifier: the cls expert, for strategy "cls".
        cache_root: SVD cache root (default `svd.default_cache_root()`).
        progress: show progress bars.

    Raises:
        AdaptError: no experts, or experts with different targets.
        experts.ExpertError, svd.FingerprintError: an expert does not fit the model.
    """
    if not experts:
        raise AdaptError("need at least one expert")
    everyone = [*experts.values(), *([classifier] if classifier is not None else [])]
    targets = {expert.targets for expert in everyone}
    if len(targets) != 1:
        raise AdaptError(f"experts adapt different matrices: {sorted(targets)}")
    factors = svd.checkpoint_factors(
        loaded.checkpoint,
        next(iter(targets)),
        cache_root=cache_root,
        stacked=model_lib.is_stacked(loaded.weights.layers),
        dtype=loaded.weights.embed.dtype,
        mesh=loaded.mesh,
        progress=progress,
    )
    for expert in everyone:
        experts_lib.check_compatible(expert, factors)
    return ExpertModel(
        config=loaded.config,
        weights=loaded.weights,
        sampler=Sampler.for_model(loaded),
        factors=factors,
        experts=dict(experts),
        classifier=classifier,
    )


# ----------------------------------------------------------------------------------------------
# Generation and scoring with one expert per row.


def _sampler_over(sampler: Sampler, weights: model_lib.Weights) -> Sampler:
    """A sampler like `sampler` (tokenizer, end ids, padding, sharding) over other weights."""
    return Sampler(
        sampler.config,
        weights,
        sampler.tokenizer,
        [int(i) for i in np.asarray(sampler.eos_ids)],
        sampler.sampler_config,
        sampler.batch_sharding,
        sampler.batch_multiple,
    )


def _expert_table(choices: Sequence[svf_lib.ZVectors | None]) -> dict[str, Array]:
    """{key: [C, L, R]}: the choices' z stacked, the base weights (None) as z = 1."""
    like = next(z for z in choices if z is not None)
    rows = [z if z is not None else {k: jnp.ones_like(v) for k, v in like.items()} for z in choices]
    return svf_lib.stack_experts(rows)  # {key: [C, L, R]}


def _per_row_svf(
    model: ExpertModel, table: Mapping[str, Array], row_choice: Sequence[int]
) -> svf_lib.ModelSVF:
    """Factored SVF with row i adapted by choice `row_choice[i]` (the sampler pads the rows)."""
    index = jnp.asarray(row_choice, jnp.int32)  # [B]
    z = {key: jnp.swapaxes(jnp.take(t, index, axis=0), 0, 1) for key, t in table.items()}
    return svd.svf_from_factors(model.factors, z, "factored")  # z: {key: [L, B, R]}


def generate_rows(
    model: ExpertModel,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    choices: Sequence[svf_lib.ZVectors | None],
    row_choice: Sequence[int],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    rows_per_call: int | None = None,
) -> Generation:
    """Greedy generation where prompt i runs with the weights of `choices[row_choice[i]]`.

    Rows using different choices share one sampler call (factored SVF, one z per row); when every
    row uses the same choice, its W' is merged once and decoding runs at the base model's cost.

    Args:
        model: the model and its factors.
        prompts: rendered prompt strings or token-id lists.
        choices: z vectors {key: [L, R]} per choice, or None for the base weights.
        row_choice: the choice of each prompt.
        max_new_tokens: generation budget per row.
        stop_strings: generation stops at any of these.
        rows_per_call: rows per sampler call (None: every row in one call).

    Returns:
        The generation, in prompt order.
    """
    if len(row_choice) != len(prompts):
        raise AdaptError(f"{len(prompts)} prompts but {len(row_choice)} row choices")
    used = sorted(set(row_choice))
    step = rows_per_call or max(len(prompts), 1)
    if len(used) == 1:
        z = choices[used[0]]
        sampler = model.sampler
        if z is not None:
            sampler = _sampler_over(
                sampler, svd.merge_into_weights(model.weights, model.factors, z)
            )
        calls = [
            sampler.generate(
                prompts[start : start + step],
                max_new_tokens=max_new_tokens,
                stop_strings=stop_strings,
            )
            for start in range(0, len(prompts), step)
        ]
        return _concatenate(calls)
    table = _expert_table(choices)
    calls = []
    for start in range(0, len(prompts), step):
        svf = _per_row_svf(model, table, row_choice[start : start + step])
        calls.append(
            model.sampler.generate(
                prompts[start : start + step],
                max_new_tokens=max_new_tokens,
                stop_strings=stop_strings,
                svf=svf,
            )
        )
    return _concatenate(calls)


def _concatenate(generations: Sequence[Generation]) -> Generation:
    return Generation(
        texts=[text for g in generations for text in g.texts],
        token_ids=[ids for g in generations for ids in g.token_ids],
        finish_reasons=[reason for g in generations for reason in g.finish_reasons],
    )


@functools.partial(jax.jit, static_argnames=("config", "mean"))
def _target_logprob(
    config: ModelConfig,
    weights: model_lib.Weights,
    svf: svf_lib.ModelSVF | None,
    tokens: Array,
    mask: Array,
    target_mask: Array,
    mean: bool,
) -> Array:
    """Summed (or mean) log-probability of the tokens marked by `target_mask` [B, T] given what
    precedes them; 0 for rows without targets. Logits are formed 64 positions at a time."""
    positions = model_lib.positions_from_mask(mask)  # [B, T]
    hidden, _ = model_lib.forward(config, weights, tokens, positions, mask, svf=svf)  # [B, T, D]
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # [B, T]: the token each one predicts
    scored = jnp.pad(target_mask[:, 1:], ((0, 0), (0, 1)))  # [B, T]
    chunk = math.gcd(tokens.shape[1], 64)
    token_logprobs, _ = logprobs.token_log_probs(weights, hidden, next_tokens, chunk)  # [B, T]
    total = jnp.sum(jnp.where(scored, token_logprobs, 0.0), axis=-1)  # [B]
    return total / jnp.maximum(jnp.sum(scored, axis=-1), 1) if mean else total  # [B]


def output_logprobs(
    model: ExpertModel,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    choices: Sequence[svf_lib.ZVectors | None],
    row_choice: Sequence[int],
    *,
    batch_size: int = 16,
    reduce: Literal["mean", "sum"] = "mean",
) -> np.ndarray:
    """Log-probability of each output given its prompt, under its row's weights: the mean per
    token (the official CEM tie-break score) or the sum (the output's log-likelihood); 0.0 for
    an empty output.

    Returns:
        [B] float32.
    """
    sequences = [list(p) + list(o) for p, o in zip(prompt_ids, output_ids, strict=True)]
    if not sequences:
        return np.zeros(0, np.float32)
    length = bucket_length(max(map(len, sequences)), model.sampler.sampler_config.prompt_buckets)
    base_only = all(choices[c] is None for c in set(row_choice))
    table = None if base_only else _expert_table([*choices, None])
    results = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        outputs = output_ids[start : start + batch_size]
        tokens, mask = left_pad(chunk, length, batch_size)  # [b, T] each
        target_mask = np.zeros_like(mask)
        for row, output in enumerate(outputs):
            target_mask[row, length - len(output) :] = len(output) > 0
        choice = list(row_choice[start : start + batch_size])
        choice += [len(choices)] * (batch_size - len(choice))  # padding rows: the base weights
        svf = None if base_only else _per_row_svf(model, table, choice)
        scores = _target_logprob(
            model.config, model.weights, svf, tokens, mask, target_mask, reduce == "mean"
        )  # [b]
        results.append(np.asarray(scores)[: len(chunk)])
    return np.concatenate(results)


# ----------------------------------------------------------------------------------------------
# Strategies A and B: dispatch by classification.


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Pass 1 of the dispatch strategies: the parsed category and raw answer per request."""

    categories: tuple[str, ...]
    outputs: tuple[str, ...]
    method: DispatchMethod = "generate"


def classification_prompt(tokenizer: Any, question: str, official_quirks: bool = False) -> str:
    """The pass-1 request: system = the official classification prompt, user = the question,
    rendered with the model's chat template (`official_quirks`: the official Llama-3 template)."""
    example = Example(id="dispatch", question=question, answer=None)
    return render_prompt(_CLS_TASK, example, tokenizer, official_quirks)


def classify(
    model: ExpertModel,
    questions: Sequence[str],
    *,
    use_classifier: bool = False,
    method: DispatchMethod = "generate",
    max_new_tokens: int = 512,
    rows_per_call: int | None = None,
    official_quirks: bool = False,
) -> Dispatch:
    """Pass 1 of strategies A (base weights) and B (`use_classifier`: the cls expert's weights).

    `method` "generate" (official): greedy answers to the classification prompt, parsed to code /
    math / reasoning / other (no `\\boxed{}` category: other). "likelihood": each of the four
    answers `CLASSIFICATION_ANSWER` is scored as the reply to the same prompt and the most likely
    one is taken (always a valid category; one batched teacher-forced pass, no generation).
    """
    if use_classifier and model.classifier is None:
        raise AdaptError("strategy 'cls' needs a classification expert")
    if method not in DISPATCH_METHODS:
        raise AdaptError(f"unknown dispatch {method!r}; choose one of {DISPATCH_METHODS}")
    tokenizer = model.sampler.tokenizer
    prompts = [classification_prompt(tokenizer, q, official_quirks) for q in questions]
    first_pass_z = model.expert_z[CLASSIFIER] if use_classifier else None
    if method == "likelihood":
        return _classify_by_likelihood(model, prompts, first_pass_z, rows_per_call)
    generation = generate_rows(
        model,
        prompts,
        [first_pass_z],
        [0] * len(prompts),
        max_new_tokens=max_new_tokens,
        stop_strings=_CLS_TASK.stop_strings,
        rows_per_call=rows_per_call,
    )
    categories = tuple(parse_category(text) for text in generation.texts)
    return Dispatch(categories=categories, outputs=tuple(generation.texts))


def _classify_by_likelihood(
    model: ExpertModel,
    prompts: Sequence[str],
    z: svf_lib.ZVectors | None,
    rows_per_call: int | None,
) -> Dispatch:
    labels = (*CATEGORIES, OTHER)
    answers = [CLASSIFICATION_ANSWER.format(label) for label in labels]
    prompt_ids = model.sampler.encode(prompts)
    answer_ids = model.sampler.encode(answers)
    rows = [(p, a) for p in prompt_ids for a in answer_ids]  # question-major
    scores = output_logprobs(
        model,
        [p for p, _ in rows],
        [a for _, a in rows],
        [z],
        [0] * len(rows),
        batch_size=rows_per_call or 16,
        reduce="sum",
    ).reshape(len(prompts), len(labels))  # [Q, 4]
    best = np.argmax(scores, axis=-1)  # [Q]
    return Dispatch(
        categories=tuple(labels[i] for i in best),
        outputs=tuple(answers[i] for i in best),
        method="likelihood",
    )


def route(
    categories: Sequence[str],
    experts: Sequence[str],
    *,
    official_other: bool = False,
    first_pass: str | None = None,
) -> list[str | None]:
    """The weights of pass 2 per request: the expert named like its category, else the base
    weights (None).

    Args:
        categories: pass-1 categories (code, math, reasoning, other).
        experts: available expert names.
        official_other: reproduce the official bug: "other" requests run with the weights loaded
            last, i.e. the expert of the last category in the official order code, math,
            reasoning that received a request, or the pass-1 weights when none did.
        first_pass: the pass-1 weights ("cls" or None), for `official_other`.
    """
    routes = [category if category in experts else None for category in categories]
    if not official_other:
        return routes
    loaded = [c for c in CATEGORIES if c in experts and c in categories]
    last = loaded[-1] if loaded else first_pass
    return [
        last if category == OTHER else r for category, r in zip(categories, routes, strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# Strategy C: few-shot CEM over mixing coefficients.


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    """Settings of the few-shot search (official defaults, spec 4.4).

    Attributes:
        shots: examples of the task the search scores candidates on.
        generations: CEM generations (`scripts/eval_few_shot.sh`: 50).
        population_size: candidates per generation.
        elite_ratio: fraction of candidates kept as elites.
        std_init: initial std of every coefficient.
        alpha_shape: "per_matrix" ([K, #matrices], the official `per_layer=true`) or "global" [K].
        mix_space: mix z ("z", the paper) or raw pre-sigmoid p ("p", the official code).
        normalize: divide alpha by its sum over experts (official scripts: no).
        tie_break: break accuracy ties by the mean log-likelihood of the correct answers.
        seed: PRNG seed of the search.
        split_seed: seed of the shots / reported items split (None: the task's official seed).
        rows_per_call: rows per sampler call when scoring a generation (None: all P x N at once).
        per_candidate: score each candidate in its own merged sampler call instead (see
            `score_population`; faster on CPUs from about 3 shots).
        logprob_batch_size: rows per teacher-forced pass of the tie-break.
    """

    shots: int = 10
    generations: int = 50
    population_size: int = 32
    elite_ratio: float = 0.2
    std_init: float = 0.5
    alpha_shape: Literal["per_matrix", "global"] = "per_matrix"
    mix_space: experts_lib.MixSpace = "z"
    normalize: bool = False
    tie_break: bool = True
    seed: int = 0
    split_seed: int | None = None
    rows_per_call: int | None = None
    per_candidate: bool = False
    logprob_batch_size: int = 16

    def __post_init__(self):
        if self.alpha_shape not in ("per_matrix", "global"):
            raise AdaptError(
                f"alpha_shape must be 'per_matrix' or 'global', not {self.alpha_shape}"
            )
        if self.mix_space not in ("z", "p"):
            raise AdaptError(f"mix_space must be 'z' or 'p', not {self.mix_space!r}")
        if self.shots < 1 or self.generations < 1:
            raise AdaptError("few-shot search needs at least one shot and one generation")


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
    matrices = model.factors.num_layers * len(model.targets)
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
    logprob_batch_size: int = 16,
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
        logprob_batch_size: rows per teacher-forced pass.
    """
    num_candidates = next(iter(z_population.values())).shape[0]
    num_shots = len(shots)
    choices = [{k: v[p] for k, v in z_population.items()} for p in range(num_candidates)]
    row_choice = np.repeat(np.arange(num_candidates), num_shots).tolist()  # [P * N]
    prompt_ids = model.sampler.encode(shot_prompts)
    settings = dict(max_new_tokens=max_new_tokens, stop_strings=stop_strings)
    if per_candidate:
        generation = _concatenate(
            [generate_rows(model, prompt_ids, [z], [0] * num_shots, **settings) for z in choices]
        )
    else:
        generation = generate_rows(
            model,
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
            row_logprobs = output_logprobs(
                model,
                [prompt_ids[row % num_shots] for row in rows],
                [generation.token_ids[row] for row in rows],
                choices,
                [row_choice[row] for row in rows],
                batch_size=logprob_batch_size,
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
    order = model.targets
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
            logprob_batch_size=config.logprob_batch_size,
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


# ----------------------------------------------------------------------------------------------
# The two-pass pipeline.


@dataclasses.dataclass(frozen=True)
class AdaptOptions:
    """Settings of a two-pass run.

    Attributes:
        max_new_tokens: pass-2 generation budget (the task's official value in the CLI).
        stop_strings: pass-2 stop strings.
        rows_per_call: rows per sampler call in pass 2 (None: the whole batch in one call).
        classify_max_new_tokens: pass-1 budget of the dispatch strategies.
        dispatch: how pass 1 reads the category: "generate" (official: generate and parse the
            first `\\boxed{}`) or "likelihood" (the most likely of the four answers).
        official_other: "other" runs with the last-loaded expert (the official bug).
        official_quirks: render the classification prompt with the official Llama-3 template.
        few_shot: settings of strategy "fewshot".
    """

    max_new_tokens: int = 512
    stop_strings: tuple[str, ...] = OFFICIAL_STOP_STRINGS
    rows_per_call: int | None = None
    classify_max_new_tokens: int = 512
    dispatch: DispatchMethod = "generate"
    official_other: bool = False
    official_quirks: bool = False
    few_shot: FewShotConfig = FewShotConfig()


@dataclasses.dataclass(frozen=True)
class AdaptRun:
    """What a two-pass run did.

    Attributes:
        strategy: "prompt", "cls" or "fewshot".
        examples: the requests (free prompts are examples without answers).
        prompts: their rendered pass-2 prompts.
        outputs: pass-2 completions.
        routes: per request, the expert used in pass 2 (None: base; "mixture": few-shot z').
        first_pass_seconds: wall time of pass 1 (classification, or the CEM search).
        second_pass_seconds: wall time of pass 2.
        dispatch: pass 1 of the dispatch strategies.
        few_shot: pass 1 of the few-shot strategy.
    """

    strategy: str
    examples: tuple[Example, ...]
    prompts: tuple[str, ...]
    outputs: tuple[str, ...]
    routes: tuple[str | None, ...]
    first_pass_seconds: float
    second_pass_seconds: float
    dispatch: Dispatch | None = None
    few_shot: FewShotResult | None = None


def adapt(
    model: ExpertModel,
    strategy: Strategy,
    examples: Sequence[Example],
    prompts: Sequence[str],
    options: AdaptOptions = AdaptOptions(),
    *,
    task: Task | None = None,
    shots: Sequence[Example] = (),
    shot_prompts: Sequence[str] = (),
    progress: bool = False,
) -> AdaptRun:
    """Runs pass 1 and pass 2 of a strategy for a whole batch of requests.

    Args:
        model: the model and its experts.
        strategy: "prompt", "cls" or "fewshot".
        examples: the requests; pass 1 of the dispatch strategies classifies `example.question`.
        prompts: the requests' rendered pass-2 prompts (e.g. `render_prompt`).
        options: settings.
        task: the task the shots come from (strategy "fewshot").
        shots: the few-shot examples (strategy "fewshot"; see `few_shot_split`).
        shot_prompts: their rendered prompts.
        progress: show the CEM progress bar.

    Raises:
        AdaptError: unknown strategy, or missing pieces for it.
    """
    if strategy not in STRATEGIES:
        raise AdaptError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if len(examples) != len(prompts):
        raise AdaptError(f"{len(examples)} examples but {len(prompts)} prompts")
    start = time.perf_counter()
    dispatch = few_shot = None
    if strategy == "fewshot":
        if task is None or not shots or len(shots) != len(shot_prompts):
            raise AdaptError("strategy 'fewshot' needs a task, shots and their prompts")
        few_shot = few_shot_search(
            model,
            task,
            shots,
            shot_prompts,
            options.few_shot,
            max_new_tokens=options.max_new_tokens,
            stop_strings=options.stop_strings,
            progress=progress,
        )
        routes, choices, row_choice = [MIXTURE] * len(prompts), [few_shot.z], [0] * len(prompts)
    else:
        dispatch = classify(
            model,
            [example.question for example in examples],
            use_classifier=strategy == "cls",
            method=options.dispatch,
            max_new_tokens=options.classify_max_new_tokens,
            rows_per_call=options.rows_per_call,
            official_quirks=options.official_quirks,
        )
        routes = route(
            dispatch.categories,
            tuple(model.experts),
            official_other=options.official_other,
            first_pass=CLASSIFIER if strategy == "cls" else None,
        )
        names = sorted(set(routes), key=str)
        choices = [None if name is None else model.expert_z[name] for name in names]
        row_choice = [names.index(name) for name in routes]
    first_pass = time.perf_counter() - start
    generation = generate_rows(
        model,
        prompts,
        choices,
        row_choice,
        max_new_tokens=options.max_new_tokens,
        stop_strings=options.stop_strings,
        rows_per_call=options.rows_per_call,
    )
    return AdaptRun(
        strategy=strategy,
        examples=tuple(examples),
        prompts=tuple(prompts),
        outputs=tuple(generation.texts),
        routes=tuple(routes),
        first_pass_seconds=first_pass,
        second_pass_seconds=time.perf_counter() - start - first_pass,
        dispatch=dispatch,
        few_shot=few_shot,
    )


def evaluate_method(
    model: ExpertModel,
    method: str,
    task: Task,
    items: Sequence[Example],
    options: AdaptOptions,
    *,
    limit: int | None = None,
    progress: bool = False,
) -> AdaptRun:
    """One cell of Table 2: the base model ("base") or a strategy on a task's items.

    Every method answers the same items: the first `limit` of those left after taking the
    few-shot shots (`split_items`), which is what the few-shot strategy reports on; prompts are
    rendered with the model's chat template (or the official templates with
    `options.official_quirks`).

    Args:
        model: the model and its experts (and the classifier for "cls").
        method: "base", "prompt", "cls" or "fewshot".
        task: the task (MATH, HumanEval and ARC-Challenge have official few-shot seeds).
        items: its evaluation split, in the official order.
        options: settings (generation budget and stop strings of the task).
        limit: answer only the first `limit` reported items.
        progress: show the CEM progress bar.
    """
    shots, reported = split_items(task.name, items, options.few_shot)
    examples = reported[:limit]
    tokenizer = model.sampler.tokenizer

    def render(example: Example) -> str:
        return render_prompt(task, example, tokenizer, options.official_quirks)

    prompts = [render(example) for example in examples]
    if method != "base":
        shot_prompts = [render(shot) for shot in shots]
        return adapt(
            model,
            method,
            examples,
            prompts,
            options,
            task=task,
            shots=shots,
            shot_prompts=shot_prompts,
            progress=progress,
        )
    start = time.perf_counter()
    generation = generate_rows(
        model,
        prompts,
        [None],
        [0] * len(prompts),
        max_new_tokens=options.max_new_tokens,
        stop_strings=options.stop_strings,
        rows_per_call=options.rows_per_call,
    )
    return AdaptRun(
        strategy="base",
        examples=tuple(examples),
        prompts=tuple(prompts),
        outputs=tuple(generation.texts),
        routes=(None,) * len(examples),
        first_pass_seconds=0.0,
        second_pass_seconds=time.perf_counter() - start,
    )


def score_run(run: AdaptRun, task: Task | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Per-request records and a summary of a run (scored when `task` is given).

    Returns:
        (records: id, prompt, output, route, [category, classification], [gold, extracted,
        correct, reward, reason]; summary: strategy, n, [task, correct, accuracy, standard_error],
        first/second pass seconds and their ratio, route counts ("base": the base weights),
        [alpha, experts, history]).
    """
    records = [
        {"id": example.id, "prompt": prompt, "output": output, "route": route_name}
        for example, prompt, output, route_name in zip(
            run.examples, run.prompts, run.outputs, run.routes, strict=True
        )
    ]
    if run.dispatch is not None:
        for record, category, text in zip(
            records, run.dispatch.categories, run.dispatch.outputs, strict=True
        ):
            record.update(category=category, classification=text)
    summary: dict[str, Any] = {
        "strategy": run.strategy,
        "n": len(records),
        "first_pass_seconds": run.first_pass_seconds,
        "second_pass_seconds": run.second_pass_seconds,
        "pass_ratio": run.first_pass_seconds / max(run.second_pass_seconds, 1e-9),
        "routes": {
            name or "base": run.routes.count(name) for name in sorted(set(run.routes), key=str)
        },
    }
    if run.dispatch is not None:
        summary["dispatch"] = run.dispatch.method
    if task is not None:
        scores = task.score_batch(list(run.examples), list(run.outputs))
        for record, example, score in zip(records, run.examples, scores, strict=True):
            record.update(
                gold=example.answer,
                extracted=score.extracted,
                correct=score.correct,
                reward=reward_of(score),
                reason=score.reason,
            )
        correct = sum(score.correct for score in scores)
        summary.update(
            task=task.name,
            correct=correct,
            accuracy=correct / len(scores) if scores else 0.0,
            standard_error=standard_error(correct, len(scores)),
        )
    if run.few_shot is not None:
        summary.update(
            experts=list(run.few_shot.experts),
            alpha=run.few_shot.alpha.tolist(),
            history=run.few_shot.history,
        )
    return records, summary


def dispatch_confusion(categories: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Confusion counts [3, 4] of dispatch decisions keyed by task name (see
    `reports.confusion_counts`): the true category of each task's items is the expertise the
    task needs (`CATEGORY_OF_TASK`); `categories[task]` are the dispatched ones."""
    truth = [CATEGORY_OF_TASK[name] for name, chosen in categories.items() for _ in chosen]
    predicted = [category for chosen in categories.values() for category in chosen]
    return reports.confusion_counts(truth, predicted)

"""Strategies A and B (spec 4.1, 4.3): pass 1 classifies each request as code / math / reasoning /
other, with the base weights ("prompt") or the classification expert's ("cls"), and pass 2 routes
it to the expert of its category."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from t2jax import reports
from t2jax.adaptation.config import AdaptError
from t2jax.adaptation.expert_model import CLASSIFIER, ExpertModel
from t2jax.svf import core as svf_lib
from t2jax.tasks import CATEGORIES, Example, parse_category, render_prompt
from t2jax.tasks.cls import (
    CLASSIFICATION_ANSWER,
    DISPATCH_METHODS,
    OTHER,
    ClsTask,
    DispatchMethod,
)

DISPATCH_LABELS = (*CATEGORIES, OTHER)  # the likelihood dispatch's candidate replies
# Which expertise each benchmark needs (rows of the dispatch confusion matrix, paper Fig. 6).
CATEGORY_OF_TASK = {
    "math": "math",
    "gsm8k": "math",
    "humaneval": "code",
    "mbpp": "code",
    "arc_challenge": "reasoning",
    "arc_easy": "reasoning",
}
_CLS_TASK = ClsTask()
# Questions without content whose replies' likelihoods estimate the model's prior over the labels
# (contextual calibration, Zhao et al. 2021, "Calibrate Before Use").
CONTENT_FREE_QUESTIONS = ("N/A", "", "[MASK]")


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """Pass 1 of the dispatch strategies: the parsed category and raw answer per request.

    The likelihood methods also keep what they decided on: `label_scores` [Q, 4], the
    log-likelihood of each `DISPATCH_LABELS` answer before calibration, and ("calibrated")
    `label_prior` [4], its mean over the `CONTENT_FREE_QUESTIONS`.
    """

    categories: tuple[str, ...]
    outputs: tuple[str, ...]
    method: DispatchMethod = "generate"
    label_scores: np.ndarray | None = None
    label_prior: np.ndarray | None = None


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
    "calibrated": the same, each answer's log-likelihood less its mean log-likelihood as the reply
    to the `CONTENT_FREE_QUESTIONS` (a small model's preference for one label whatever the
    question cancels out; three more prompts per call).

    Raises:
        AdaptError: no classification expert for `use_classifier`, or an unknown method.
    """
    if use_classifier and model.classifier is None:
        raise AdaptError("strategy 'cls' needs a classification expert")
    if method not in DISPATCH_METHODS:
        raise AdaptError(f"unknown dispatch {method!r}; choose one of {DISPATCH_METHODS}")
    prompts = [
        classification_prompt(model.adapted.tokenizer, q, official_quirks) for q in questions
    ]
    first_pass_z = model.expert_z[CLASSIFIER] if use_classifier else None
    if method != "generate":
        scores = _label_log_likelihoods(model, prompts, first_pass_z, rows_per_call)  # [Q, 4]
        prior = None
        if method == "calibrated":
            content_free = [
                classification_prompt(model.adapted.tokenizer, q, official_quirks)
                for q in CONTENT_FREE_QUESTIONS
            ]
            prior = _label_log_likelihoods(model, content_free, first_pass_z, rows_per_call)
            prior = prior.mean(axis=0)  # [4]
        categories = most_likely_labels(scores, prior)
        return Dispatch(
            categories=categories,
            outputs=tuple(CLASSIFICATION_ANSWER.format(c) for c in categories),
            method=method,
            label_scores=scores,
            label_prior=prior,
        )
    generation = model.adapted.generate(
        prompts,
        [first_pass_z],
        [0] * len(prompts),
        max_new_tokens=max_new_tokens,
        stop_strings=_CLS_TASK.stop_strings,
        rows_per_call=rows_per_call,
    )
    categories = tuple(parse_category(text) for text in generation.texts)
    return Dispatch(categories=categories, outputs=tuple(generation.texts))


def most_likely_labels(scores: np.ndarray, prior: np.ndarray | None = None) -> tuple[str, ...]:
    """The `DISPATCH_LABELS` entry of highest score per row of `scores` [Q, 4], less `prior` [4]
    where given (the calibrated dispatch)."""
    calibrated = scores if prior is None else scores - prior  # [Q, 4]
    return tuple(DISPATCH_LABELS[i] for i in np.argmax(calibrated, axis=-1))


def _label_log_likelihoods(
    model: ExpertModel,
    prompts: Sequence[str],
    z: svf_lib.ZVectors | None,
    rows_per_call: int | None,
) -> np.ndarray:
    """[Q, 4] log-likelihood of each `DISPATCH_LABELS` answer as the reply to each prompt."""
    answers = [CLASSIFICATION_ANSWER.format(label) for label in DISPATCH_LABELS]
    prompt_ids = model.adapted.sampler.encode(prompts)
    answer_ids = model.adapted.sampler.encode(answers)
    rows = [(p, a) for p in prompt_ids for a in answer_ids]  # question-major
    return model.adapted.log_likelihood(
        [p for p, _ in rows],
        [a for _, a in rows],
        [z],
        [0] * len(rows),
        rows_per_call=rows_per_call or 16,
        reduce="sum",
    ).reshape(len(prompts), len(DISPATCH_LABELS))  # [Q, 4]


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


def dispatch_confusion(categories: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Confusion counts [3, 4] of dispatch decisions keyed by task name (see
    `reports.confusion_counts`): the true category of each task's items is the expertise the
    task needs (`CATEGORY_OF_TASK`); `categories[task]` are the dispatched ones."""
    truth = [CATEGORY_OF_TASK[name] for name, chosen in categories.items() for _ in chosen]
    predicted = [category for chosen in categories.values() for category in chosen]
    return reports.confusion_counts(truth, predicted)

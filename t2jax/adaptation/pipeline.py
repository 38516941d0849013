"""Inference-time self-adaptation: the two-pass pipeline of Transformer² (spec section 4; paper
section 3.2).

Pass 1 decides which expertise each request needs; pass 2 answers with the adapted weights.
  * "prompt" (A, spec 4.1): the base model answers the official classification prompt; the first
    `\\boxed{}` names code / math / reasoning, anything else is "other" and gets the base weights
    (`official_other=True` reproduces the official code, where "other" runs with whatever expert
    was loaded last).
  * "cls" (B, spec 4.3): the same with the classification expert's weights in pass 1 (an expert
    file trained by `t2jax train` on the `cls` task).
  * "fewshot" (C, spec 4.4): CEM over mixing coefficients of the experts (`few_shot`).

The official code reloads vLLM weights once per predicted category and once per CEM candidate.
Here pass 2 serves a whole batch in one sampler call with one expert per row (factored SVF); a
batch whose rows all share one expert is merged instead (decoding at the base model's cost).

    model = build_expert_model(load_model("smollm2-135m-instruct"), {"math": ..., "code": ...})
    run = adapt(model, "prompt", examples, prompts, AdaptOptions(max_new_tokens=512))
    records, summary = write_run("runs/adapt/x", run, task)
"""

from __future__ import annotations

import dataclasses
import os
import time
import typing
from collections.abc import Sequence
from typing import Any

from t2jax import evaluation, reports
from t2jax.adaptation.config import AdaptError, AdaptOptions, Strategy
from t2jax.adaptation.dispatch import Dispatch, classify, route
from t2jax.adaptation.expert_model import CLASSIFIER, ExpertModel
from t2jax.adaptation.few_shot import FewShotResult, few_shot_search, split_items
from t2jax.tasks import Example, Task, render_prompt

STRATEGIES = typing.get_args(Strategy)
MIXTURE = "mixture"  # route name of the few-shot mixture


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
        options: settings (a budget or stop strings left at None are the task's, or the
            free-prompt defaults without one).
        task: the task the shots come from (strategy "fewshot").
        shots: the few-shot examples (strategy "fewshot"; see `few_shot.split_items`).
        shot_prompts: their rendered prompts.
        progress: show the CEM progress bar.

    Raises:
        AdaptError: unknown strategy, or missing pieces for it.
    """
    if strategy not in STRATEGIES:
        raise AdaptError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if len(examples) != len(prompts):
        raise AdaptError(f"{len(examples)} examples but {len(prompts)} prompts")
    options = options.for_task(task)
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
    generation = model.adapted.generate(
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
    options: AdaptOptions = AdaptOptions(),
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
        options: settings (a budget or stop strings left at None are the task's).
        limit: answer only the first `limit` reported items.
        progress: show the CEM progress bar.
    """
    options = options.for_task(task)
    shots, reported = split_items(task.name, items, options.few_shot)
    examples = reported[:limit]
    tokenizer = model.adapted.tokenizer

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
    generation = model.adapted.generate(
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
    """Per-request records (`evaluation.sample_record`) and a summary of a run (scored when `task`
    is given).

    Returns:
        (records: id, prompt, output, route, [category, classification], [gold, extracted,
        correct, reward, reason]; summary: strategy, n, [task, correct, accuracy, standard_error],
        first/second pass seconds and their ratio, route counts ("base": the base weights),
        [dispatch], [alpha, experts, history]).
    """
    scores = [None] * len(run.examples)
    if task is not None:
        scores = task.score_batch(list(run.examples), list(run.outputs))
    records = [
        evaluation.sample_record(
            example, prompt, output, score, route=route_name, **_dispatch_fields(run, i)
        )
        for i, (example, prompt, output, route_name, score) in enumerate(
            zip(run.examples, run.prompts, run.outputs, run.routes, scores, strict=True)
        )
    ]
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
        summary.update(task=task.name, **evaluation.score_summary(records))
    if run.few_shot is not None:
        summary.update(
            experts=list(run.few_shot.experts),
            alpha=run.few_shot.alpha.tolist(),
            history=run.few_shot.history,
        )
    return records, summary


def _dispatch_fields(run: AdaptRun, index: int) -> dict[str, str]:
    """The pass-1 category and raw answer of request `index` (none without dispatch)."""
    if run.dispatch is None:
        return {}
    return {
        "category": run.dispatch.categories[index],
        "classification": run.dispatch.outputs[index],
    }


def write_run(
    out_dir: str | os.PathLike, run: AdaptRun, task: Task | None = None
) -> tuple[list[dict], dict[str, Any]]:
    """Scores a run (`score_run`) and writes it to `out_dir` (`evaluation.write_run`, with the
    summary table `reports.run_markdown`).

    Returns:
        (records, summary).
    """
    records, summary = score_run(run, task)
    evaluation.write_run(out_dir, records, summary, reports.run_markdown)
    return records, summary

"""A configured self-adaptation run end to end: load the model and experts, answer the requests
with a strategy, write the run directory (what `t2jax adapt` and adaptation sweeps run).

    config = configuration.from_dict(AdaptConfig, {
        "model": {"name": "qwen2.5-coder-0.5b-instruct"},
        "experts": "math=math.safetensors,code=code.safetensors,reasoning=arc.safetensors",
        "strategy": "prompt", "requests": {"task": "arc_challenge", "limit": 50},
    })
    summary = run_adapt(config)

The directory gets confusion.png (dispatch on a task) or alpha.png (few-shot), then samples.jsonl,
summary.json and summary.md (`pipeline.write_run`); summary.json is written last, so its presence
marks a finished run. With `compare_base`, the base model's run of the same items goes to base/
first, comparison.md shows both answers of every item (`reports.item_comparison`) and the
summary gets the base accuracy ("base").
"""

from __future__ import annotations

import pathlib
from typing import Any

from t2jax import evaluation, files, reports
from t2jax.adaptation import pipeline
from t2jax.adaptation.config import AdaptConfig, AdaptError
from t2jax.adaptation.dispatch import CATEGORY_OF_TASK, dispatch_confusion
from t2jax.adaptation.expert_model import ExpertModel, build_expert_model, load_named_experts
from t2jax.adaptation.few_shot import split_items
from t2jax.loading import load_model_section
from t2jax.tasks import CATEGORIES, Example, Task, get_task, render_prompt
from t2jax.tasks.prompts import render_chat

BASE_DIR = "base"  # the base model's run inside an adapted run's directory (compare_base)
COMPARISON_FILE = "comparison.md"


def run_directory(config: AdaptConfig) -> pathlib.Path:
    """`config.run.workdir`, or runs/adapt/MODEL-STRATEGY-TASK."""
    if config.run.workdir is not None:
        return pathlib.Path(config.run.workdir)
    model_name = pathlib.Path(config.model.name).name.removesuffix(".gguf")
    requests = config.requests.task or "prompts"
    return pathlib.Path("runs/adapt") / f"{model_name}-{config.strategy}-{requests}"


def load_experts(config: AdaptConfig) -> ExpertModel:
    """Loads the model, its experts and the SVD factors of their targets.

    `experts` / `cls_expert` "builtin" name the model's shipped experts (`t2jax.svf.shipped`).

    Raises:
        AdaptError: dispatch experts not named after a category.
        ValueError: "builtin" for a model without shipped experts.
        t2jax.svf.experts.ExpertError: an unreadable or mismatched expert file.
    """
    experts, classifier = load_named_experts(config.model.name, config.experts, config.cls_expert)
    if config.strategy != "fewshot" and not set(experts) <= set(CATEGORIES):
        raise AdaptError(
            f"dispatch experts must be named code, math or reasoning: {config.experts}"
        )
    loaded = load_model_section(config.model, progress=config.run.progress)
    return build_expert_model(
        loaded, experts, classifier, cache_root=config.cache_dir, progress=config.run.progress
    )


def answer_prompts(
    model: ExpertModel, config: AdaptConfig, task: Task | None, items: list[Example]
) -> pipeline.AdaptRun:
    """The free prompts (chat template) as requests; few-shot adapts on the task's shots."""
    tokenizer = model.adapted.tokenizer
    prompts = config.requests.prompts
    examples = [Example(f"prompt/{i}", text, None) for i, text in enumerate(prompts)]
    rendered = [render_chat(tokenizer, text) for text in prompts]
    options = config.options
    shots = split_items(task.name, items, options.few_shot)[0] if task is not None else []
    shot_prompts = [render_prompt(task, s, tokenizer, options.official_quirks) for s in shots]
    return pipeline.adapt(
        model,
        config.strategy,
        examples,
        rendered,
        options,
        task=task,
        shots=shots,
        shot_prompts=shot_prompts,
        progress=config.run.progress,
    )


def run_adapt(config: AdaptConfig, model: ExpertModel | None = None) -> dict[str, Any]:
    """Runs (or reruns) a configured two-pass run and writes its directory.

    Args:
        config: the run.
        model: an already loaded model with the run's experts (default: loaded from `config`).

    Returns:
        The summary (also in summary.json).
    """
    config.validate()
    task = get_task(config.requests.task) if config.requests.task else None
    items = task.load(config.requests.split, config.requests.data_dir) if task is not None else []
    model = model or load_experts(config)
    out = run_directory(config)
    out.mkdir(parents=True, exist_ok=True)
    if config.requests.prompts:
        run = answer_prompts(model, config, task, items)
    else:
        run = _task_run(model, config, config.strategy, task, items)
    plot_run(out, run, config.requests.task)
    if not config.compare_base:
        return pipeline.write_run(out, run, None if config.requests.prompts else task)[1]
    base_records, base_summary = pipeline.write_run(
        out / BASE_DIR, _task_run(model, config, "base", task, items), task
    )
    records, summary = pipeline.score_run(run, task)
    summary["base"] = {key: base_summary[key] for key in ("correct", "accuracy", "standard_error")}
    files.write_text_atomically(
        out / COMPARISON_FILE,
        reports.item_comparison({"base": base_records, f"adapted ({config.strategy})": records}),
    )
    evaluation.write_run(out, records, summary, reports.run_markdown)
    return summary


def _task_run(
    model: ExpertModel, config: AdaptConfig, method: str, task: Task, items: list[Example]
) -> pipeline.AdaptRun:
    """The run's items of `task` answered by `method` ("base" or the strategy)."""
    return pipeline.evaluate_method(
        model,
        method,
        task,
        items,
        config.options,
        limit=config.requests.limit,
        progress=config.run.progress,
    )


def plot_run(out: pathlib.Path, run: pipeline.AdaptRun, task_name: str | None) -> None:
    """confusion.png for dispatch on a task of known category, alpha.png for few-shot."""
    if run.dispatch is not None and task_name in CATEGORY_OF_TASK:
        counts = dispatch_confusion({task_name: run.dispatch.categories})
        reports.plot_confusions({run.strategy: counts}, out / "confusion.png")
    if run.few_shot is not None:
        reports.plot_alpha({task_name: run.few_shot.alpha}, run.few_shot.experts, out / "alpha.png")

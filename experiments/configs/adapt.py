"""Self-adaptation run configs (`t2jax.adaptation.config.AdaptConfig`) for `t2jax adapt --config`
and adaptation sweeps.

    t2jax adapt --config=experiments/configs/adapt.py:task=math,strategy=fewshot,preset=cpu \
        --config.experts=math=m.safetensors,code=c.safetensors,reasoning=r.safetensors \
        --config.options.few_shot.generations=2

Arguments ("key=value,..."): model (default smollm2-135m-instruct), task (arc_challenge),
strategy (prompt), preset ("official": the official few-shot search, 10 shots x 32 candidates x 50
generations; "cpu": 5 shots x 8 candidates x 2 generations and a 256-token answer budget, what a
2-core machine finishes in minutes per task).
"""

from __future__ import annotations

from t2jax import configuration
from t2jax.adaptation.config import AdaptConfig

PRESETS = {
    "official": {},
    "cpu": {
        "options.max_new_tokens": 256,
        "options.classify_max_new_tokens": 64,
        "options.few_shot.shots": 5,
        "options.few_shot.population_size": 8,
        "options.few_shot.elite_ratio": 0.25,
        "options.few_shot.generations": 2,
    },
}


def get_config(arg: str = ""):
    """The `ConfigDict` of an `AdaptConfig` for "model=...,task=...,strategy=...,preset=..."."""
    options = dict(item.split("=", 1) for item in arg.split(",") if item)
    unknown = set(options) - {"model", "task", "strategy", "preset"}
    if unknown:
        raise ValueError(f"unknown config argument(s) {sorted(unknown)}")
    overrides = {
        "model.name": options.get("model", "smollm2-135m-instruct"),
        "requests.task": options.get("task", "arc_challenge"),
        "strategy": options.get("strategy", "prompt"),
        **PRESETS[options.get("preset", "official")],
    }
    return configuration.to_config_dict(configuration.with_overrides(AdaptConfig(), overrides))

"""SVF expert training (REINFORCE), the official recipe of spec section 2.4 by default, and the
paper's baselines (LoRA / IA3 / DoRA, next-token prediction) through the same trainer.

    t2jax train --config=experiments/configs/svf.py:model=qwen2.5-coder-0.5b-instruct,task=gsm8k \
        --config.rl.lr=1e-3
    python experiments/train_svf.py --config=experiments/configs/svf.py:task=arc_easy,preset=cpu

The argument after ':' is comma-separated key=value pairs:
    model   what `t2jax.loading.load_model` loads (default smollm2-135m-instruct)
    task    a `t2jax.tasks` name or a synthetic task (default gsm8k)
    method  the adapter trained: svf (default), lora, ia3 or dora (`adapter.method`; the paper's
            r=16, alpha=32, dropout 0.05 on q/v for LoRA and DoRA, k/v/down for IA3)
    objective  rl (REINFORCE, default) or ntp (next-token prediction on the training split's
            reference solutions; `rl.objective`)
    preset  "official" (default): batch 256, 200 updates, the task's token budget;
            "cpu": a budget for a 2-core CPU (batch 32, 128 new tokens, 40 updates, evaluation on
            64 train items and a seeded random 200 valid items every 5 updates)
The run directory defaults to runs/svf/TASK-MODEL-PRESET, with -METHOD-OBJECTIVE appended unless
they are svf and rl.
"""

from __future__ import annotations

import pathlib

from t2jax import configuration
from t2jax.config import ModelSection
from t2jax.rl import config as rl_config

PRESETS = {
    "official": {},
    "cpu": {
        "rl.batch_size": 32,
        "rl.microbatch_size": 8,
        "rl.num_iters": 40,
        "rl.eval_every": 5,
        "rl.logprob_chunk": 64,
        "task.max_new_tokens": 128,
        "task.eval_train_limit": 64,
        "task.valid_sample": 200,
        "task.rows_per_call": 32,
    },
}
KEYS = ("model", "task", "preset", "method", "objective")


def get_config(arg: str = ""):
    """The `ConfigDict` of a `t2jax.rl.config.TrainConfig` for "model=...,task=...,preset=..."."""
    options = dict(part.split("=", 1) for part in arg.split(",") if part)
    unknown = sorted(set(options) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown config argument(s) {unknown}; use {', '.join(KEYS)}")
    model = options.get("model", ModelSection().name)
    task = options.get("task", rl_config.TaskSection().name)
    preset = options.get("preset", "official")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    method = options.get("method", rl_config.AdapterSection().method)
    objective = options.get("objective", rl_config.RLConfig().objective)
    workdir = f"runs/svf/{task}-{pathlib.Path(model).name.removesuffix('.gguf')}-{preset}"
    if (method, objective) != ("svf", "rl"):
        workdir += f"-{method}-{objective}"
    overrides = {
        "model.name": model,
        "task.name": task,
        "adapter.method": method,
        "rl.objective": objective,
        "run.workdir": workdir,
        **PRESETS[preset],
    }
    config = configuration.with_overrides(rl_config.TrainConfig(), overrides)
    return configuration.to_config_dict(config)

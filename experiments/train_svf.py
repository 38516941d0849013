"""Train an SVF expert (thin absl entry point; all logic is in `t2jax.rl.trainer`).

    python experiments/train_svf.py \
        --config=experiments/configs/svf.py:model=qwen2.5-coder-0.5b-instruct,task=gsm8k \
        --config.rl.lr=1e-3 --config.run.workdir=runs/gsm8k

Same as `t2jax train`, with `ml_collections.config_flags` parsing the overrides. On a multi-host
TPU slice, `launch/run_on_vm.sh` starts it on every worker with T2JAX_DISTRIBUTED=1.
"""

from __future__ import annotations

import json

from absl import app
from ml_collections import config_flags

from t2jax import configuration, parallel
from t2jax.rl import config as rl_config

_CONFIG = config_flags.DEFINE_config_file("config", help_string="experiments/configs/*.py:ARG")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    parallel.maybe_initialize_distributed()
    from t2jax.rl.trainer import train

    summary = train(configuration.from_config_dict(rl_config.TrainConfig, _CONFIG.value))
    if parallel.is_main_process():
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)

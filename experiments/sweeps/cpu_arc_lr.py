"""Learning rate x seed on ARC-Easy with SmolLM2-135M-Instruct, at the 2-core CPU budget.

t2jax sweep experiments/sweeps/cpu_arc_lr.py --root runs/sweeps/cpu_arc_lr
"""

from t2jax.sweeps import grid

CONFIG = "experiments/configs/svf.py:model=smollm2-135m-instruct,task=arc_easy,preset=cpu"


def sweep():
    return grid({"rl.lr": [2e-3, 1e-2], "rl.seed": [42, 43]})

"""Few-shot CEM settings on ARC-Challenge with Qwen2.5-Coder-0.5B-Instruct at the 2-core CPU
budget (an adaptation sweep: each run is a `t2jax adapt` run; $EXPERTS names the expert files).

EXPERTS=math=m.safetensors,code=c.safetensors,reasoning=r.safetensors \
    t2jax sweep experiments/sweeps/cpu_fewshot.py --root runs/sweeps/cpu_fewshot
"""

import os

from t2jax.sweeps import grid

COMMAND = "adapt"
CONFIG = (
    "experiments/configs/adapt.py:model=qwen2.5-coder-0.5b-instruct,task=arc_challenge,"
    "strategy=fewshot,preset=cpu"
)


EXPERTS = "math=math.safetensors,code=code.safetensors,reasoning=reasoning.safetensors"
OVERRIDES = {"experts": os.environ.get("EXPERTS", EXPERTS), "requests.limit": 100}


def sweep():
    return grid({"options.few_shot.mix_space": ["z", "p"], "options.few_shot.generations": [2, 4]})

"""The paper's KL-coefficient sweep (spec section 2.4: lambda in {0, 0.1, 0.2, 0.3}, selected by
validation accuracy), on GSM8K with Qwen2.5-Coder-0.5B-Instruct, in both KL directions.

    t2jax sweep experiments/sweeps/paper_kl.py --root runs/sweeps/paper_kl
"""

from t2jax.sweeps import grid

CONFIG = "experiments/configs/svf.py:model=qwen2.5-coder-0.5b-instruct,task=gsm8k"


def sweep():
    with_kl = grid(
        {"rl.kl_coeff": [0.1, 0.2, 0.3], "rl.kl_direction": ["ref_policy", "policy_ref"]}
    )
    return [{"rl.kl_coeff": 0.0}, *with_kl]

"""SVF targets: which matrices of a decoder layer are adapted, their HF names, their shapes, and
the trainable-parameter counts of SVF (and LoRA, for comparison) on them.

Spec section 1.4 lists the target sets, section 1.5 the parameter counts. A target is a module key
of a decoder layer ("mlp.up_proj"); a layer's matrix is named as in the HF state dict
("model.layers.3.mlp.up_proj.weight"), which also names its SVD factors on disk and its vector in
an expert file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax

from t2jax import model as model_lib
from t2jax.adapters import core as adapters
from t2jax.checkpoints import common as checkpoints_common
from t2jax.config import ModelConfig
from t2jax.svf import core as svf_lib

MODULE_ORDER = model_lib.ATTN_KERNELS + model_lib.MLP_KERNELS  # HF state-dict order in a layer
TARGET_SETS = {
    "mlp": model_lib.MLP_KERNELS,  # the official code's default (spec section 1.4)
    "qv": ("self_attn.q_proj", "self_attn.v_proj"),  # the paper's 0.16M "attention" ablation
    "attn": model_lib.ATTN_KERNELS,
    "all": MODULE_ORDER,
}
_TENSOR_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


class SVDError(ValueError):
    """Targets, SVD factors or z vectors that do not match the model, each other, or the request."""


def resolve_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Module keys of target sets and module keys, given as a sequence or a comma-separated string
    ("mlp", "qv,mlp", "mlp.up_proj,self_attn.q_proj"), in HF state-dict order.

    Raises:
        SVDError: an unknown set or module key.
    """
    parts = [part.strip() for part in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [name for part in parts for name in TARGET_SETS.get(part, (part,))]
    unknown = sorted(set(names) - set(MODULE_ORDER))
    if unknown or not names:
        raise SVDError(
            f"unknown SVF targets {unknown or spec!r}; use one of {sorted(TARGET_SETS)} or "
            f"module keys from {list(MODULE_ORDER)}"
        )
    return tuple(key for key in MODULE_ORDER if key in names)


def hf_tensor_name(layer: int, key: str) -> str:
    """HF name of a layer's kernel: (3, "mlp.up_proj") -> "model.layers.3.mlp.up_proj.weight"."""
    return f"model.layers.{layer}.{key}.weight"


def parse_hf_tensor_name(name: str) -> tuple[int, str]:
    """Inverse of `hf_tensor_name`.

    Raises:
        SVDError: not the name of a per-layer linear kernel.
    """
    match = _TENSOR_NAME.fullmatch(name)
    if not match or match.group(2) not in MODULE_ORDER:
        raise SVDError(f"{name!r} is not the HF name of a decoder layer's linear weight")
    return int(match.group(1)), match.group(2)


def kernel_shape(config: ModelConfig, key: str) -> tuple[int, int]:
    """[in, out] shape of a per-layer kernel of `config`."""
    out_dim, in_dim = checkpoints_common.expected_hf_shapes(config)[hf_tensor_name(0, key)]
    return in_dim, out_dim


def svf_param_shapes(config: ModelConfig, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Module key -> [L, R] with R = min(in, out), the reduced SVD's rank."""
    return {key: (config.num_layers, min(kernel_shape(config, key))) for key in targets}


def svf_param_count(config: ModelConfig, targets: Sequence[str]) -> int:
    """Exact number of trainable SVF parameters, from shapes only (`jax.eval_shape`, no weights).

    Llama-3-8B: 393,216 for the MLP targets and 163,840 for q/v (spec section 1.5).
    """
    shapes = svf_param_shapes(config, targets)
    abstract = jax.eval_shape(lambda: svf_lib.init_params(jax.random.key(0), shapes))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))


def adapter_param_count(
    config: ModelConfig, kind: str, targets: Sequence[str], rank: int = 16
) -> int:
    """Trainable parameters of a LoRA / IA3 / DoRA adapter (`kind`) on the same kernels
    (`t2jax.adapters.core.parameter_count`).

    Llama-3-8B, LoRA rank 16 on q/v: 6,815,744 (spec section 1.5).
    """
    shapes = {key: kernel_shape(config, key) for key in targets}
    return adapters.parameter_count(kind, shapes, config.num_layers, rank)

"""LoRA, DoRA and IA3 adapters in HF PEFT's file format: `adapter_config.json` +
`adapter_model.safetensors` (what `peft.PeftModel.from_pretrained` loads and `save_pretrained`
writes), so an adapter trained in t2jax serves with transformers / vLLM and one trained elsewhere
(the official code's `use_lora` path) evaluates in t2jax.

Tensors are keyed `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight`
([r, in]), `lora_B.weight` ([out, r]) and, for DoRA, `lora_magnitude_vector` ([out]); t2jax keeps
A and B transposed ([in, r], [r, out]). IA3's vector is `{module}.ia3_l`: [out, 1] for a module
whose output it scales, [1, in] for one of `feedforward_modules` (input scaled). Reading checks
everything against the model before any array is used: files, PEFT type, options t2jax does not
implement, module names, ranks, shapes.
Writing goes to a temporary directory renamed into place, so nothing is left half-written.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from t2jax import files
from t2jax import model as model_lib
from t2jax.adapters.core import (
    IA3_INPUT_MODULES,
    DoRATarget,
    IA3Target,
    LayerAdapters,
    LoRATarget,
    ModelAdapters,
)
from t2jax.checkpoints.common import expected_hf_shapes
from t2jax.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
KEY = re.compile(rf"^{re.escape(PREFIX)}\.(\d+)\.((?:self_attn|mlp)\.\w+)\.(\w+?)(?:\.weight)?$")
# PEFT options whose non-default values change the math; t2jax refuses them instead of ignoring.
UNSUPPORTED = {
    "use_rslora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "modules_to_save": None,
}


class AdapterFormatError(ValueError):
    """A PEFT adapter directory that is missing, corrupt or made for another model."""


def _kernel_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """[in, out] of every per-layer kernel, by HF module key ("self_attn.q_proj")."""
    prefix = "model.layers.0."
    return {
        name[len(prefix) :].removesuffix(".weight"): (shape[1], shape[0])
        for name, shape in expected_hf_shapes(config).items()
        if name.startswith(prefix) and name.endswith("_proj.weight")
    }


def _peft_config(kind: type, ranks: set[int], alpha: float | None, modules: set[str]) -> dict:
    """adapter_config.json of one adapter kind on `modules` (layer-relative module keys)."""
    names = sorted(key.split(".")[-1] for key in modules)
    if kind is IA3Target:
        return {
            "peft_type": "IA3",
            "task_type": "CAUSAL_LM",
            "target_modules": names,
            "feedforward_modules": sorted(
                key.split(".")[-1] for key in modules if key in IA3_INPUT_MODULES
            ),
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "init_ia3_weights": True,
        }
    if alpha is None:
        raise AdapterFormatError("a LoRA / DoRA adapter needs its alpha")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ranks.pop(),
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": names,
        "use_dora": kind is DoRATarget,
        **UNSUPPORTED,
    }


def _target_tensors(name: str, target, alpha: float | None) -> dict[str, np.ndarray]:
    """PEFT's tensors of one layer's module `name` (full PEFT prefix)."""
    if isinstance(target, IA3Target):
        if np.ndim(target.vector) != 1:
            raise AdapterFormatError(f"{name}: PEFT's format holds one IA3 adapter")
        vector = np.asarray(target.vector, np.float32)
        shape = (1, -1) if target.on_input else (-1, 1)
        return {f"{name}.ia3_l": np.ascontiguousarray(vector.reshape(shape))}
    if not isinstance(target, LoRATarget | DoRATarget) or np.ndim(target.a) != 2:
        raise AdapterFormatError(f"{name}: PEFT's format holds one LoRA/DoRA/IA3 adapter")
    if alpha is not None and not np.isclose(target.scale, alpha / target.a.shape[1]):
        raise AdapterFormatError(f"{name}: scale {target.scale} is not alpha / r")
    # Contiguous: safetensors writes an array's buffer as it lies in memory.
    tensors = {
        f"{name}.lora_A.weight": np.ascontiguousarray(np.asarray(target.a).T),
        f"{name}.lora_B.weight": np.ascontiguousarray(np.asarray(target.b).T),
    }
    if isinstance(target, DoRATarget):
        tensors[f"{name}.lora_magnitude_vector"] = np.asarray(target.magnitude, np.float32)
    return tensors


def save_peft(
    directory: str | os.PathLike,
    adapter: ModelAdapters,
    config: ModelConfig,
    *,
    alpha: float | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a LoRA / DoRA / IA3 `adapter` (stacked or one `LayerAdapters` per layer) in PEFT's
    format.

    Args:
        directory: the adapter directory to create.
        adapter: targets of one kind (and, for LoRA / DoRA, one rank) on the same modules in
            every layer.
        config: the base model's architecture.
        alpha: `lora_alpha` (LoRA / DoRA: the scale of every target must be alpha / r).
        base_model: `base_model_name_or_path` to record.
        overwrite: replace an existing directory.

    Raises:
        AdapterFormatError: an adapter PEFT cannot represent.
        DestinationError: `directory` is a file, or not empty and not `overwrite`.
    """
    out = pathlib.Path(directory)
    files.check_destination(out, overwrite)
    layers = unstacked(adapter, config.num_layers)
    tensors, kinds, ranks, modules = {}, set(), set(), None
    for index, layer in enumerate(layers):
        if modules is not None and set(layer.targets) != modules:
            raise AdapterFormatError(f"layer {index} adapts other modules than layer 0")
        modules = set(layer.targets)
        for key, target in layer.targets.items():
            tensors.update(_target_tensors(f"{PREFIX}.{index}.{key}", target, alpha))
            kinds.add(type(target))
            if not isinstance(target, IA3Target):
                ranks.add(target.a.shape[1])
    if len(kinds) != 1 or len(ranks) > 1:
        raise AdapterFormatError("PEFT's format needs one kind (LoRA, DoRA or IA3) and one rank")
    adapter_config = {
        **_peft_config(kinds.pop(), ranks, alpha, modules),
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }

    def write(temporary: pathlib.Path) -> None:
        (temporary / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        safetensors.numpy.save_file(tensors, temporary / WEIGHTS_FILE)

    files.write_directory(out, write, overwrite=overwrite)
    return out


def unstacked(adapter: ModelAdapters, num_layers: int) -> tuple[LayerAdapters, ...]:
    """One `LayerAdapters` per layer of a stacked ([L, ...] leaves) or per-layer adapter.

    Raises:
        AdapterFormatError: another number of layers than `num_layers`.
    """
    layers = adapter.layers
    if not isinstance(layers, tuple):
        leaves = jax.tree.leaves(layers)
        count = leaves[0].shape[0] if leaves else 0
        layers = tuple(model_lib.layer_slice(layers, i) for i in range(count))
    if len(layers) != num_layers:
        raise AdapterFormatError(f"{len(layers)} adapter layers for a {num_layers}-layer model")
    return layers


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
    """adapter_config.json, checked for what t2jax implements."""
    path = directory / CONFIG_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise AdapterFormatError(f"{directory} needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        adapter_config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"{path} is not valid JSON: {error}") from None
    if adapter_config.get("peft_type") not in ("LORA", "IA3"):
        raise AdapterFormatError(
            f"{path}: peft_type {adapter_config.get('peft_type')!r}; t2jax reads LORA and IA3 "
            f"adapters"
        )
    for option, default in UNSUPPORTED.items():
        if adapter_config.get(option, default) not in (default, None, {}, [], False):
            raise AdapterFormatError(f"{path}: {option}={adapter_config[option]!r} not supported")
    if adapter_config["peft_type"] == "IA3":
        return adapter_config
    for field in ("r", "lora_alpha"):
        if not isinstance(adapter_config.get(field), int | float) or adapter_config[field] <= 0:
            raise AdapterFormatError(f"{path}: {field} must be a positive number")
    return adapter_config


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load_file(path)
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise AdapterFormatError(f"{path} is not a readable safetensors file: {error}") from None


def load_peft(directory: str | os.PathLike, config: ModelConfig) -> ModelAdapters:
    """Reads a PEFT LoRA / DoRA / IA3 adapter for a model of `config` (one `LayerAdapters` per
    layer).

    Raises:
        AdapterFormatError: missing or corrupt files, an unsupported PEFT option, unknown module
            names, a rank or shape that does not match the config or the model.
    """
    directory = pathlib.Path(directory)
    adapter_config = _read_config(directory)
    shapes = _kernel_shapes(config)
    grouped: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, tensor in _read_tensors(directory / WEIGHTS_FILE).items():
        match = KEY.match(name)
        if match is None or match.group(2) not in shapes:
            raise AdapterFormatError(f"{name}: not a LoRA tensor of this model's modules")
        layer, key, part = int(match.group(1)), match.group(2), match.group(3)
        if layer >= config.num_layers:
            raise AdapterFormatError(f"{name}: layer {layer} of a {config.num_layers}-layer model")
        grouped.setdefault((layer, key), {})[part] = tensor
    layers = [dict() for _ in range(config.num_layers)]
    for (layer, key), parts in sorted(grouped.items()):
        if adapter_config["peft_type"] == "IA3":
            on_input = key.split(".")[-1] in (adapter_config.get("feedforward_modules") or [])
            layers[layer][key] = _ia3_target(key, parts, shapes[key], on_input)
        else:
            layers[layer][key] = _target(key, parts, shapes[key], adapter_config)
    if not grouped:
        raise AdapterFormatError(f"{directory / WEIGHTS_FILE} holds no LoRA tensors")
    return ModelAdapters(tuple(LayerAdapters(targets) for targets in layers))


def _ia3_target(key, parts, shape, on_input: bool) -> IA3Target:
    """One module's IA3 target from its `ia3_l` tensor, its shape checked ([in, out] = `shape`)."""
    want = (1, shape[0]) if on_input else (shape[1], 1)
    if set(parts) != {"ia3_l"}:
        raise AdapterFormatError(f"{key}: tensors {sorted(parts)}, expected ['ia3_l']")
    if parts["ia3_l"].shape != want:
        raise AdapterFormatError(f"{key}.ia3_l: shape {parts['ia3_l'].shape}, expected {want}")
    return IA3Target(jnp.asarray(parts["ia3_l"].reshape(-1), jnp.float32), on_input)


def _target(key, parts, shape, adapter_config) -> LoRATarget | DoRATarget:
    """One module's LoRA / DoRA target from its PEFT tensors, shapes checked ([in, out] =
    `shape`)."""
    rank, scale = int(adapter_config["r"]), adapter_config["lora_alpha"] / adapter_config["r"]
    use_dora = bool(adapter_config.get("use_dora"))
    expected = {"lora_A": (rank, shape[0]), "lora_B": (shape[1], rank)}
    if use_dora:
        expected["lora_magnitude_vector"] = (shape[1],)
    if set(parts) != set(expected):
        raise AdapterFormatError(f"{key}: tensors {sorted(parts)}, expected {sorted(expected)}")
    for part, want in expected.items():
        if parts[part].shape != want:
            raise AdapterFormatError(
                f"{key}.{part}: shape {parts[part].shape}, expected {want} (rank {rank})"
            )
    a = jnp.asarray(parts["lora_A"].T, jnp.float32)  # [in, r]
    b = jnp.asarray(parts["lora_B"].T, jnp.float32)  # [r, out]
    if use_dora:
        magnitude = jnp.asarray(parts["lora_magnitude_vector"], jnp.float32)  # [out]
        return DoRATarget(a, b, magnitude, scale)
    return LoRATarget(a, b, scale)

"""LoRA and DoRA adapters in HF PEFT's file format: `adapter_config.json` +
`adapter_model.safetensors` (what `peft.PeftModel.from_pretrained` loads and `save_pretrained`
writes), so an adapter trained in t2jax serves with transformers / vLLM and one trained elsewhere
(the official code's `use_lora` path) evaluates in t2jax.

Tensors are keyed `base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight`
([r, in]), `lora_B.weight` ([out, r]) and, for DoRA, `lora_magnitude_vector` ([out]); t2jax keeps
A and B transposed ([in, r], [r, out]). Reading checks everything against the model before any
array is used: files, PEFT type, options t2jax does not implement, module names, ranks, shapes.
Writing goes to a temporary directory renamed into place, so nothing is left half-written.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from t2jax import files
from t2jax.adapters.core import DoRATarget, LayerAdapters, LoRATarget, ModelAdapters
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


def save_peft(
    directory: str | os.PathLike,
    adapter: ModelAdapters,
    config: ModelConfig,
    *,
    alpha: float,
    base_model: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes a LoRA / DoRA `adapter` (one `LayerAdapters` per layer) in PEFT's format.

    Args:
        directory: the adapter directory to create.
        adapter: LoRA or DoRA targets of equal rank on the same modules in every layer.
        config: the base model's architecture (shapes are checked against it).
        alpha: `lora_alpha` (the scale of every target must be alpha / r).
        base_model: `base_model_name_or_path` to record.
        overwrite: replace an existing directory.

    Raises:
        AdapterFormatError: an adapter PEFT cannot represent.
        DestinationError: `directory` is a file, or not empty and not `overwrite`.
    """
    out = pathlib.Path(directory)
    files.check_destination(out, overwrite)
    layers = adapter.layers
    if not isinstance(layers, tuple) or len(layers) != config.num_layers:
        raise AdapterFormatError(f"expected one LayerAdapters per layer ({config.num_layers})")
    tensors, kinds, ranks, modules = {}, set(), set(), None
    for index, layer in enumerate(layers):
        if modules is not None and set(layer.targets) != modules:
            raise AdapterFormatError(f"layer {index} adapts other modules than layer 0")
        modules = set(layer.targets)
        for key, target in layer.targets.items():
            if not isinstance(target, LoRATarget | DoRATarget) or np.ndim(target.a) != 2:
                raise AdapterFormatError(f"{key}: PEFT's LoRA format holds one LoRA/DoRA adapter")
            kinds.add(type(target))
            ranks.add(target.a.shape[1])
            name = f"{PREFIX}.{index}.{key}"
            # Contiguous: safetensors writes an array's buffer as it lies in memory.
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(target.a).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(target.b).T)
            if isinstance(target, DoRATarget):
                tensors[f"{name}.lora_magnitude_vector"] = np.asarray(target.magnitude, np.float32)
            if not np.isclose(target.scale, alpha / target.a.shape[1]):
                raise AdapterFormatError(f"{key}: scale {target.scale} is not alpha / r")
    if len(kinds) != 1 or len(ranks) != 1:
        raise AdapterFormatError("PEFT's format needs one kind (LoRA or DoRA) and one rank")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ranks.pop(),
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(key.split(".")[-1] for key in modules),
        "use_dora": kinds.pop() is DoRATarget,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        **UNSUPPORTED,
    }

    def write(temporary: pathlib.Path) -> None:
        (temporary / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        safetensors.numpy.save_file(tensors, temporary / WEIGHTS_FILE)

    files.write_directory(out, write, overwrite=overwrite)
    return out


def _read_config(directory: pathlib.Path) -> dict[str, Any]:
    """adapter_config.json, checked for what t2jax implements."""
    path = directory / CONFIG_FILE
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise AdapterFormatError(f"{directory} needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        adapter_config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"{path} is not valid JSON: {error}") from None
    if adapter_config.get("peft_type") != "LORA":
        raise AdapterFormatError(
            f"{path}: peft_type {adapter_config.get('peft_type')!r}; t2jax reads LORA adapters"
        )
    for option, default in UNSUPPORTED.items():
        if adapter_config.get(option, default) not in (default, None, {}, [], False):
            raise AdapterFormatError(f"{path}: {option}={adapter_config[option]!r} not supported")
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
    """Reads a PEFT LoRA / DoRA adapter for a model of `config` (one `LayerAdapters` per layer).

    Raises:
        AdapterFormatError: missing or corrupt files, an unsupported PEFT option, unknown module
            names, a rank or shape that does not match the config or the model.
    """
    directory = pathlib.Path(directory)
    adapter_config = _read_config(directory)
    rank, scale = int(adapter_config["r"]), adapter_config["lora_alpha"] / adapter_config["r"]
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
    use_dora = bool(adapter_config.get("use_dora"))
    layers = [dict() for _ in range(config.num_layers)]
    for (layer, key), parts in sorted(grouped.items()):
        layers[layer][key] = _target(key, parts, shapes[key], rank, scale, use_dora)
    if not grouped:
        raise AdapterFormatError(f"{directory / WEIGHTS_FILE} holds no LoRA tensors")
    return ModelAdapters(tuple(LayerAdapters(targets) for targets in layers))


def _target(key, parts, shape, rank, scale, use_dora) -> LoRATarget | DoRATarget:
    """One module's target from its PEFT tensors, shapes checked ([in, out] = `shape`)."""
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

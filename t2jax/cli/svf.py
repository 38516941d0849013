"""`t2jax` subcommands for SVF: `decompose`, `expert list|info|mix|transfer|import`, and `params`.

    t2jax decompose --model smollm2-135m-instruct --targets mlp
    t2jax expert list [--model qwen2.5-coder-0.5b-instruct]
    t2jax expert info math.safetensors
    t2jax expert mix --experts math.safetensors,code.safetensors --alpha 0.7,0.3 --out m.safetensors
    t2jax expert transfer --expert llama_math.safetensors --model MISTRAL_DIR --out m.safetensors
    t2jax expert import policy_params.pt --model LLAMA_DIR --out math.safetensors
    t2jax params --model Meta-Llama-3-8B-Instruct/config.json --targets qv --lora-rank 16

`register` adds them to the main parser's subparsers; each sets `func(args) -> int` (exit status).
Spec sections 1.1 (decomposition), 1.5 (parameter counts), 4.4 (mixing) and 6 (transfer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import numpy as np

from t2jax.checkpoints import load_checkpoint
from t2jax.config import ModelConfig
from t2jax.plan import models as plan_models
from t2jax.svf import cache as svf_cache
from t2jax.svf import experts as experts_lib
from t2jax.svf import factors as svf_factors
from t2jax.svf import shipped
from t2jax.svf import targets as svf_targets


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the SVF subcommands to `subparsers` (from `ArgumentParser.add_subparsers`)."""
    _register_decompose(subparsers)
    _register_params(subparsers)
    expert = subparsers.add_parser("expert", help="inspect, mix, transfer and import SVF experts")
    commands = expert.add_subparsers(dest="expert_command", required=True)
    _register_expert_list(commands)
    _register_expert_info(commands)
    _register_expert_mix(commands)
    _register_expert_transfer(commands)
    _register_expert_import(commands)


def _add_targets(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--targets",
        default="mlp",
        help=f"one of {sorted(svf_targets.TARGET_SETS)} or comma-separated module keys "
        "(default: mlp)",
    )


# ----------------------------------------------------------------------------------------------
# decompose and params.


def _register_decompose(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decompose", help="SVD (fp32) of a model's SVF target matrices, cached on disk"
    )
    parser.add_argument("--model", required=True, help="registry name, .gguf, HF dir or hub id")
    _add_targets(parser)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"factors go to CACHE_DIR/<fingerprint> (default {svf_cache.default_cache_root()})",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(func=_decompose)


def _decompose(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(args.model, progress=not args.no_progress)
    targets = svf_targets.resolve_targets(args.targets)
    model_fingerprint = svf_cache.fingerprint(checkpoint.config, checkpoint.tensors)
    root = pathlib.Path(args.cache_dir) if args.cache_dir else svf_cache.default_cache_root()
    start = time.perf_counter()
    directory = svf_cache.decompose_to_cache(
        checkpoint.config,
        svf_factors.kernels_from_tensors(checkpoint.tensors),
        targets,
        root / model_fingerprint,
        fingerprint=model_fingerprint,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    matrices = checkpoint.config.num_layers * len(targets)
    print(f"model {checkpoint.source}: fingerprint {model_fingerprint}")
    print(f"{matrices} matrices ({', '.join(targets)}) in {directory} ({seconds:.1f} s)")
    return 0


def _register_params(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "params", help="exact trainable-parameter counts of SVF, LoRA, DoRA and IA3 for a model"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="an HF config.json or a paper model name (shapes only), or any model as loaded",
    )
    _add_targets(parser)
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank to compare with")
    parser.set_defaults(func=_params)


def _params(args: argparse.Namespace) -> int:
    config = _model_config(args.model)
    targets = svf_targets.resolve_targets(args.targets)
    shapes = svf_targets.svf_param_shapes(config, targets)
    print(f"targets: {', '.join(f'{key} [{L} x {R}]' for key, (L, R) in shapes.items())}")
    print(f"SVF trainable parameters: {svf_targets.svf_param_count(config, targets):,}")
    for kind, name in (("lora", "LoRA"), ("dora", "DoRA")):
        count = svf_targets.adapter_param_count(config, kind, targets, args.lora_rank)
        print(f"{name} rank {args.lora_rank} on the same matrices: {count:,}")
    ia3 = svf_targets.adapter_param_count(config, "ia3", targets)
    print(f"IA3 on the same matrices (down_proj's input, the others' output): {ia3:,}")
    return 0


def _model_config(model: str) -> ModelConfig:
    """The config of an HF config.json file (no weights needed) or of a loadable model."""
    if model.endswith(".json"):
        return ModelConfig.from_hf(json.loads(pathlib.Path(model).read_text()))
    if model in plan_models.PAPER_MODELS:
        return plan_models.model_config(model)
    return load_checkpoint(model, progress=False).config


# ----------------------------------------------------------------------------------------------
# expert info | mix | transfer | import.


def _register_expert_list(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("list", help="the experts shipped with t2jax (--experts builtin)")
    parser.add_argument("--model", default=None, help="only this model's experts")
    parser.set_defaults(func=_expert_list)


def _expert_list(args: argparse.Namespace) -> int:
    experts = shipped.shipped_experts(shipped.model_key(args.model) if args.model else None)
    if not experts:
        print("no shipped experts" + (f" for {args.model}" if args.model else ""))
    for expert in experts:
        test = expert.card.get("test", {})
        result = ""
        if test:
            result = (
                f"test {100 * test['base_accuracy']:.1f}% -> {100 * test['accuracy']:.1f}% "
                f"({100 * test['difference']:+.1f} ± {100 * test['difference_standard_error']:.1f}"
                f" paired SE, N={test['n']})"
            )
        print(f"{expert.model}  {expert.name:9}  {expert.card.get('task', '?'):10}  {result}")
        print(f"    {expert.path}")
    return 0


def _register_expert_info(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("info", help="metadata and statistics of an expert")
    parser.add_argument("file", help="a .safetensors expert or an orbax expert directory")
    parser.set_defaults(func=_expert_info)


def _expert_info(args: argparse.Namespace) -> int:
    expert = experts_lib.load_expert(args.file)
    kind = expert.parametrization.kind
    print(f"file: {args.file}")
    print(f"model fingerprint: {expert.fingerprint or 'unknown'}")
    print(f"parametrization: {kind} (max_mult {expert.parametrization.max_mult})")
    print(f"layers: {expert.num_layers}")
    print(f"parameters: {sum(v.size for v in expert.params.values()):,}")
    for key, z in expert.z().items():
        z = np.asarray(z)
        print(
            f"  {key}: R={z.shape[1]}  z mean {z.mean():.4f} std {z.std():.4f} "
            f"min {z.min():.4f} max {z.max():.4f}"
        )
    return 0


def _register_expert_mix(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("mix", help="z' = sum_k alpha_k z_k over K experts")
    parser.add_argument("--experts", required=True, help="comma-separated expert files")
    parser.add_argument(
        "--alpha",
        required=True,
        help="K comma-separated weights, or a .npy/.json file of shape [K] or [K, #matrices]",
    )
    parser.add_argument("--normalize", action="store_true", help="divide alpha by its sum")
    parser.add_argument(
        "--space",
        choices=("z", "p"),
        default="z",
        help="mix z (default) or raw pre-sigmoid p (the official CEM code)",
    )
    parser.add_argument("--out", required=True, help="output .safetensors file or orbax dir")
    parser.set_defaults(func=_expert_mix)


def _expert_mix(args: argparse.Namespace) -> int:
    experts = [experts_lib.load_expert(path) for path in args.experts.split(",")]
    mixed = experts_lib.mix_experts(
        experts, _read_alpha(args.alpha), normalize=args.normalize, space=args.space
    )
    experts_lib.save_expert(mixed, args.out)
    print(f"mixed {len(experts)} experts ({args.space}) into {args.out}")
    return 0


def _read_alpha(spec: str) -> np.ndarray:
    """Comma-separated numbers, or a .npy / .json array file."""
    if spec.endswith(".npy"):
        return np.load(spec, allow_pickle=False)
    if spec.endswith(".json"):
        return np.asarray(json.loads(pathlib.Path(spec).read_text()), np.float32)
    return np.asarray([float(part) for part in spec.split(",")], np.float32)


def _register_expert_transfer(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "transfer", help="apply an expert of model A to model B (same ranks), optionally shuffled"
    )
    parser.add_argument("--expert", required=True, help="the expert of model A")
    parser.add_argument("--model", required=True, help="model B")
    parser.add_argument("--shuffle", action="store_true", help="the shuffled control")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    parser.add_argument("--out", required=True, help="output .safetensors file or orbax dir")
    parser.set_defaults(func=_expert_transfer)


def _expert_transfer(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(args.model, progress=False)
    expert = experts_lib.load_expert(args.expert)
    model_fingerprint = svf_cache.fingerprint(checkpoint.config, checkpoint.tensors)
    moved = experts_lib.transfer(
        expert, checkpoint.config, model_fingerprint, shuffle=args.shuffle, seed=args.seed
    )
    experts_lib.save_expert(moved, args.out)
    shuffled = f" (shuffled, seed {args.seed})" if args.shuffle else ""
    print(f"expert for {checkpoint.source} ({model_fingerprint}){shuffled} written to {args.out}")
    return 0


def _register_expert_import(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "import", help="convert an official policy_params.pt / learnable_params.pt (needs torch)"
    )
    parser.add_argument("file", help="the official .pt file")
    parser.add_argument("--model", required=True, help="the model the expert was trained for")
    _add_targets(parser)
    parser.add_argument("--max-mult", type=float, default=1.0, help="official max_mult")
    parser.add_argument("--out", required=True, help="output .safetensors file or orbax dir")
    parser.set_defaults(func=_expert_import)


def _expert_import(args: argparse.Namespace) -> int:
    checkpoint = load_checkpoint(args.model, progress=False)
    expert = experts_lib.import_official(
        args.file,
        checkpoint.config,
        svf_targets.resolve_targets(args.targets),
        max_mult=args.max_mult,
    )
    model_fingerprint = svf_cache.fingerprint(checkpoint.config, checkpoint.tensors)
    experts_lib.save_expert(dataclasses.replace(expert, fingerprint=model_fingerprint), args.out)
    print(f"imported {args.file} for {checkpoint.source} into {args.out}")
    return 0

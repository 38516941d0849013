"""SVF experts on disk and across models: portable safetensors files keyed by HF tensor names, orbax
directories, import of the official PyTorch release's files, mixing, and cross-model transfer.

An expert file holds one vector per adapted matrix, named like the matrix
("model.layers.3.mlp.gate_proj.weight" -> [R]), plus metadata: format and version, the fingerprint
of the model it was trained for (`t2jax.svf.cache.fingerprint`), its targets, its parametrization
(raw p with z = sigmoid(p) * max_mult, or plain z; spec section 1.2) and the t2jax version. Files
are untrusted: loading validates names, shapes and metadata, and applying an expert to a model
checks targets, ranks and fingerprint (`check_compatible`). Files are written atomically (a reader
never sees a torn file; see `t2jax.files`).

The official release saves `policy.state_dict()` as `policy_params.pt`: raw bf16 p vectors keyed
"learnable_params_module_list.{i}", i running over the MLP matrices in state-dict order (layer 0's
gate, up, down, then layer 1's, ...); its legacy `learnable_params.pt` keys the same vectors by HF
name. `import_official` reads both, with any key prefix.

Mixing follows spec section 4.4 (z' = sum_k alpha_k z_k; the official CEM mixes raw p), transfer
spec section 6 (vectors applied by singular-value rank; the shuffled control permutes each vector).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

import t2jax
from t2jax.config import ModelConfig
from t2jax.files import write_atomically
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets

EXPERT_FORMAT = "t2jax.svf_expert"
EXPERT_VERSION = "1"
MixSpace = Literal["z", "p"]
_OFFICIAL_INDEX = re.compile(r"(?:.*\.)?learnable_params_module_list\.(\d+)")


class ExpertError(ValueError):
    """An expert file or expert that is malformed or does not fit the model or the other experts."""


@dataclasses.dataclass(frozen=True)
class Expert:
    """One SVF expert: a vector per adapted matrix, in the space of its parametrization.

    Attributes:
        params: module key -> [L, R] raw parameters (p for "sigmoid", z for "plain"), fp32.
        parametrization: how params map to the scales z.
        fingerprint: the model the expert belongs to; None when unknown (official imports).
    """

    params: dict[str, np.ndarray]
    parametrization: svf_lib.Parametrization = svf_lib.OFFICIAL_PARAMETRIZATION
    fingerprint: str | None = None

    def __post_init__(self):
        try:
            svf_targets.resolve_targets(tuple(self.params))
        except svf_targets.SVDError as error:
            raise ExpertError(str(error)) from None
        layers = {v.shape[0] for v in self.params.values() if v.ndim == 2}
        if len(layers) != 1 or any(v.ndim != 2 for v in self.params.values()):
            shapes = {key: v.shape for key, v in self.params.items()}
            raise ExpertError(f"expert vectors must all be [L, R] with one L, got {shapes}")
        if not all(np.all(np.isfinite(v)) for v in self.params.values()):
            raise ExpertError("expert vectors contain NaN or infinite values")

    @property
    def targets(self) -> tuple[str, ...]:
        """Adapted module keys, in HF state-dict order."""
        return svf_targets.resolve_targets(tuple(self.params))

    @property
    def num_layers(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def ranks(self) -> dict[str, int]:
        """Module key -> R."""
        return {key: v.shape[1] for key, v in self.params.items()}

    def z(self) -> svf_lib.ZVectors:
        """The scales z: module key -> [L, R] fp32 device arrays."""
        params = {key: jnp.asarray(v) for key, v in self.params.items()}
        return svf_lib.z_of(params, self.parametrization)


def expert_from_params(
    params: Mapping[str, Any],
    parametrization: svf_lib.Parametrization = svf_lib.OFFICIAL_PARAMETRIZATION,
    fingerprint: str | None = None,
) -> Expert:
    """An `Expert` from SVF parameters (e.g. a trained {key: [L, R]} pytree of device arrays)."""
    host = {key: np.asarray(value, np.float32) for key, value in params.items()}
    return Expert(params=host, parametrization=parametrization, fingerprint=fingerprint)


# ----------------------------------------------------------------------------------------------
# HF-named vectors and metadata.


def expert_tensors(expert: Expert) -> dict[str, np.ndarray]:
    """HF tensor name -> [R] vector, one per adapted matrix."""
    return {
        svf_targets.hf_tensor_name(layer, key): np.ascontiguousarray(vectors[layer])
        for key, vectors in expert.params.items()
        for layer in range(expert.num_layers)
    }


def _params_from_tensors(tensors: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """Inverse of `expert_tensors`, validating names, shapes and completeness."""
    by_key: dict[str, dict[int, np.ndarray]] = {}
    for name, value in tensors.items():
        try:
            layer, key = svf_targets.parse_hf_tensor_name(name)
        except svf_targets.SVDError as error:
            raise ExpertError(f"{source}: {error}") from None
        vector = np.asarray(value, np.float32)
        if vector.ndim != 1:
            raise ExpertError(f"{source}: {name} has shape {vector.shape}, expected a vector [R]")
        by_key.setdefault(key, {})[layer] = vector
    if not by_key:
        raise ExpertError(f"{source} holds no expert vectors")
    num_layers = max(len(layers) for layers in by_key.values())
    params = {}
    for key, layers in by_key.items():
        if sorted(layers) != list(range(num_layers)):
            missing = sorted(set(range(num_layers)) - set(layers))
            raise ExpertError(f"{source}: {key} lacks the vectors of layers {missing}")
        ranks = {v.shape[0] for v in layers.values()}
        if len(ranks) != 1:
            raise ExpertError(f"{source}: the {key} vectors have different lengths {sorted(ranks)}")
        params[key] = np.stack([layers[i] for i in range(num_layers)])  # [L, R]
    return params


def _metadata(expert: Expert) -> dict[str, str]:
    return {
        "format": EXPERT_FORMAT,
        "version": EXPERT_VERSION,
        "fingerprint": expert.fingerprint or "",
        "targets": ",".join(expert.targets),
        "parametrization": expert.parametrization.kind,
        "max_mult": repr(expert.parametrization.max_mult),
        "num_layers": str(expert.num_layers),
        "t2jax_version": t2jax.__version__,
    }


def _expert_from_file(
    metadata: Mapping[str, str] | None, tensors: Mapping[str, Any], source: str
) -> Expert:
    """Validates metadata against the vectors and builds the expert."""
    metadata = dict(metadata or {})
    if metadata.get("format") != EXPERT_FORMAT:
        raise ExpertError(
            f"{source} is not a t2jax expert (metadata format {metadata.get('format')})"
        )
    if metadata.get("version") != EXPERT_VERSION:
        raise ExpertError(f"{source} has expert format version {metadata.get('version')}")
    params = _params_from_tensors(tensors, source)
    declared = metadata.get("targets", "")
    found = ",".join(svf_targets.resolve_targets(tuple(params)))
    if declared != found:
        raise ExpertError(f"{source}: metadata lists targets {declared!r}, vectors cover {found!r}")
    if metadata.get("num_layers") != str(next(iter(params.values())).shape[0]):
        raise ExpertError(f"{source}: metadata num_layers does not match the vectors")
    try:
        parametrization = svf_lib.Parametrization(
            kind=metadata.get("parametrization", ""), max_mult=float(metadata.get("max_mult", ""))
        )
    except (svf_lib.SVFError, ValueError) as error:
        raise ExpertError(f"{source}: bad parametrization metadata: {error}") from None
    fingerprint = metadata.get("fingerprint") or None
    return Expert(params=params, parametrization=parametrization, fingerprint=fingerprint)


# ----------------------------------------------------------------------------------------------
# Files.


def save_safetensors(expert: Expert, path: str | pathlib.Path) -> None:
    """Atomically writes a portable `.safetensors` expert (vectors keyed by HF names, with
    metadata)."""
    tensors, metadata = expert_tensors(expert), _metadata(expert)
    write_atomically(
        path,
        lambda temporary: safetensors.numpy.save_file(tensors, str(temporary), metadata=metadata),
    )


def load_safetensors(path: str | pathlib.Path) -> Expert:
    """Reads and validates a `.safetensors` expert.

    Raises:
        ExpertError: not a t2jax expert, or malformed.
    """
    try:
        with safetensors.safe_open(str(path), framework="numpy") as file:
            metadata = file.metadata()
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    except safetensors.SafetensorError as error:
        raise ExpertError(f"{path} is not a readable safetensors file: {error}") from None
    return _expert_from_file(metadata, tensors, str(path))


def save_orbax(expert: Expert, directory: str | pathlib.Path) -> None:
    """Writes the expert as an orbax checkpoint (names and metadata as in the safetensors file;
    orbax writes a temporary directory and renames it when complete)."""
    directory = pathlib.Path(directory).expanduser().resolve()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory, expert_tensors(expert), custom_metadata=_metadata(expert))
        checkpointer.wait_until_finished()


def load_orbax(directory: str | pathlib.Path) -> Expert:
    """Reads and validates an orbax expert checkpoint.

    Raises:
        ExpertError: not a t2jax expert, or malformed.
    """
    directory = pathlib.Path(directory).expanduser().resolve()
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(directory).custom_metadata
        tensors = checkpointer.restore(directory)
    return _expert_from_file(metadata, tensors, str(directory))


def save_expert(expert: Expert, path: str | pathlib.Path) -> None:
    """Saves as safetensors when `path` ends in `.safetensors`, else as an orbax directory."""
    if str(path).endswith(".safetensors"):
        save_safetensors(expert, path)
    else:
        save_orbax(expert, path)


def load_expert(path: str | pathlib.Path) -> Expert:
    """Loads a `.safetensors` file or an orbax directory (official `.pt` files: `import_official`).

    Raises:
        ExpertError: missing, of an unknown kind, or malformed.
    """
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        return load_orbax(path)
    if path.suffix == ".safetensors" and path.is_file():
        return load_safetensors(path)
    if path.suffix in (".pt", ".pth"):
        raise ExpertError(f"{path} is a PyTorch file: import it with `import_official`")
    raise ExpertError(f"{path} is neither a .safetensors expert file nor an orbax directory")


def import_official(
    path: str | pathlib.Path,
    config: ModelConfig,
    targets: Sequence[str] = svf_targets.TARGET_SETS["mlp"],
    *,
    max_mult: float = 1.0,
) -> Expert:
    """Imports an expert of the official PyTorch release (`policy_params.pt` or the legacy
    `learnable_params.pt`: raw p, z = sigmoid(p) * max_mult). Needs torch.

    Args:
        path: the `.pt` file (loaded with `weights_only=True`: no code runs).
        config: the model it belongs to (checks layer count and ranks).
        targets: adapted modules; index-keyed files list them layer-major in this order.
        max_mult: the official `max_mult` the expert was trained with.

    Raises:
        ExpertError: unexpected keys, counts or shapes.
    """
    try:
        import torch
    except ImportError:
        raise ExpertError("importing official .pt experts needs torch (the test extra)") from None
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ExpertError(f"{path} holds a {type(state).__name__}, expected a state dict")
    order = [
        svf_targets.hf_tensor_name(layer, key)
        for layer in range(config.num_layers)
        for key in svf_targets.resolve_targets(targets)
    ]
    tensors = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ExpertError(f"{path}: {name} is a {type(value).__name__}, expected a tensor")
        tensors[_official_hf_name(name, order, str(path))] = value.float().numpy()
    if sorted(tensors) != sorted(order):
        raise ExpertError(
            f"{path} has {len(tensors)} vectors; a {config.num_layers}-layer model with targets "
            f"{list(svf_targets.resolve_targets(targets))} needs {len(order)}"
        )
    params = _params_from_tensors(tensors, str(path))
    expert = Expert(params, svf_lib.Parametrization("sigmoid", max_mult), fingerprint=None)
    check_shapes(expert, config)
    return expert


def _official_hf_name(name: str, order: Sequence[str], source: str) -> str:
    """HF tensor name of an official state-dict key (HF name with a prefix, or a list index)."""
    if "model.layers." in name:
        return name[name.index("model.layers.") :]
    match = _OFFICIAL_INDEX.fullmatch(name)
    if match is None:
        raise ExpertError(f"{source}: unrecognized key {name!r}")
    index = int(match.group(1))
    if index >= len(order):
        raise ExpertError(f"{source}: key {name!r} is beyond the {len(order)} adapted matrices")
    return order[index]


# ----------------------------------------------------------------------------------------------
# Compatibility, mixing and transfer.


def check_shapes(expert: Expert, config: ModelConfig) -> None:
    """Checks the expert's layer count and ranks against a model of `config`.

    Raises:
        ExpertError: a mismatch, naming the matrices that differ.
    """
    shapes = svf_targets.svf_param_shapes(config, expert.targets)
    _check_ranks(expert, config.num_layers, {key: rank for key, (_, rank) in shapes.items()})


def check_compatible(
    expert: Expert, factors: svf_factors.ModelFactors, *, allow_other_model: bool = False
) -> None:
    """Checks that an expert can be applied with these factors.

    Args:
        expert: the expert.
        factors: the model's SVD factors.
        allow_other_model: accept an expert whose fingerprint names another model (cross-model
            use; shapes must still match). Prefer `transfer`, which records the new model.

    Raises:
        ExpertError: different targets, layer counts or ranks.
        svf_cache.FingerprintError: the expert belongs to another model.
    """
    if set(expert.targets) != set(factors.targets):
        raise ExpertError(
            f"the expert adapts {list(expert.targets)} but the factors cover "
            f"{list(factors.targets)}"
        )
    _check_ranks(expert, factors.num_layers, factors.ranks())
    if not allow_other_model:
        svf_cache.check_fingerprint(expert.fingerprint, factors.fingerprint, "this expert")


def _check_ranks(expert: Expert, num_layers: int, ranks: Mapping[str, int]) -> None:
    if expert.num_layers != num_layers:
        raise ExpertError(f"the expert has {expert.num_layers} layers, the model {num_layers}")
    wrong = {key: (rank, ranks[key]) for key, rank in expert.ranks().items() if rank != ranks[key]}
    if wrong:
        details = ", ".join(f"{key}: {have} vs {want}" for key, (have, want) in wrong.items())
        raise ExpertError(f"expert ranks do not match the model's singular values ({details})")


def mix_experts(
    experts: Sequence[Expert],
    alpha: Any,
    *,
    normalize: bool = False,
    space: MixSpace = "z",
) -> Expert:
    """Mixes experts: z' = sum_k alpha_k z_k (space "z", default), or z' = sum_k alpha_k p_k (space
    "p": the official CEM code, which mixes raw pre-sigmoid parameters). See `t2jax.svf.mix`.

    Args:
        experts: K experts with the same targets and shapes, for the same model.
        alpha: [K] or [K, #matrices] (matrices layer-major, targets in HF order).
        normalize: divide alpha by its sum over experts.
        space: what is mixed.

    Returns:
        A plain-z expert holding z'.

    Raises:
        ExpertError: the experts do not fit together, or alpha has the wrong shape.
    """
    if space not in ("z", "p"):
        raise ExpertError(f"unknown mixing space {space!r}; use 'z' or 'p'")
    fingerprints = {e.fingerprint for e in experts if e.fingerprint is not None}
    if len(fingerprints) > 1:
        raise ExpertError(
            f"experts belong to different models {sorted(fingerprints)}; transfer first"
        )
    vectors = [e.z() if space == "z" else e.params for e in experts]
    try:
        stacked = svf_lib.stack_experts(vectors)  # {key: [K, L, R]}
        mixed = svf_lib.mix(stacked, alpha, normalize=normalize, order=experts[0].targets)
    except svf_lib.SVFError as error:
        raise ExpertError(str(error)) from None
    return expert_from_params(
        mixed, svf_lib.Parametrization("plain"), fingerprint=next(iter(fingerprints), None)
    )


def shuffled(expert: Expert, seed: int) -> Expert:
    """The paper's control: each vector randomly permuted (its own permutation; seeded)."""
    rng = np.random.default_rng(seed)
    params = {
        key: np.stack([rng.permutation(vector) for vector in expert.params[key]])  # [L, R]
        for key in expert.targets
    }
    return dataclasses.replace(expert, params=params)


def transfer(
    expert: Expert,
    config: ModelConfig,
    fingerprint: str,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> Expert:
    """Re-targets an expert of model A to model B (spec section 6): component i of each vector
    scales B's i-th largest singular value of the same (layer, matrix).

    Args:
        expert: the expert of model A.
        config: model B's architecture.
        fingerprint: model B's fingerprint, recorded in the result.
        shuffle: apply the shuffled control (see `shuffled`).
        seed: the shuffle's seed.

    Raises:
        ExpertError: layer counts or ranks differ.
    """
    check_shapes(expert, config)
    moved = shuffled(expert, seed) if shuffle else expert
    return dataclasses.replace(moved, fingerprint=fingerprint)

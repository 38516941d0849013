"""The model every adaptation strategy runs on: an `AdaptedModel` with named SVF experts (and the
classification expert of strategy "cls")."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

from t2jax import adapted as adapted_lib
from t2jax.adaptation.config import AdaptError
from t2jax.loading import LoadedModel
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib
from t2jax.svf import shipped

CLASSIFIER = "cls"  # route name of the classification expert (official "other" quirk only)


@dataclasses.dataclass(frozen=True)
class ExpertModel:
    """An adapted model and its named experts.

    Attributes:
        adapted: the model with the SVD factors of the experts' targets.
        experts: expert name -> expert, in the order of the mixing coefficients.
        classifier: the classification expert of strategy "cls", if any.
    """

    adapted: adapted_lib.AdaptedModel
    experts: Mapping[str, experts_lib.Expert]
    classifier: experts_lib.Expert | None = None

    @functools.cached_property
    def expert_z(self) -> dict[str, svf_lib.ZVectors]:
        """Expert name (and "cls" for the classifier) -> its scales z {key: [L, R]}."""
        named = dict(self.experts)
        if self.classifier is not None:
            named[CLASSIFIER] = self.classifier
        return {name: expert.z() for name, expert in named.items()}


def build_expert_model(
    loaded: LoadedModel,
    experts: Mapping[str, experts_lib.Expert],
    classifier: experts_lib.Expert | None = None,
    *,
    cache_root: str | None = None,
    progress: bool = True,
) -> ExpertModel:
    """Computes (or reads from the cache) the SVD factors of the experts' targets and checks that
    every expert fits the model.

    Args:
        loaded: the model (`t2jax.loading.load_model`).
        experts: name -> expert (names "code", "math", "reasoning" for dispatch).
        classifier: the cls expert, for strategy "cls".
        cache_root: SVD cache root (default `t2jax.svf.cache.default_cache_root()`).
        progress: show progress bars.

    Raises:
        AdaptError: no experts, or experts with different targets.
        experts.ExpertError, cache.FingerprintError: an expert does not fit the model.
    """
    if not experts:
        raise AdaptError("need at least one expert")
    everyone = [*experts.values(), *([classifier] if classifier is not None else [])]
    targets = {expert.targets for expert in everyone}
    if len(targets) != 1:
        raise AdaptError(f"experts adapt different matrices: {sorted(targets)}")
    adapted = adapted_lib.adapted_model(
        loaded, next(iter(targets)), cache_root=cache_root, progress=progress
    )
    for expert in everyone:
        experts_lib.check_compatible(expert, adapted.factors)
    return ExpertModel(adapted=adapted, experts=dict(experts), classifier=classifier)


def parse_expert_paths(spec: str) -> dict[str, str]:
    """ "math=a.safetensors,code=b" -> {"math": "a.safetensors", "code": "b"} (order kept).

    Raises:
        ValueError: an entry without NAME=PATH, or a repeated name.
    """
    paths: dict[str, str] = {}
    for entry in spec.split(","):
        name, separator, path = entry.partition("=")
        if not separator or not name.strip() or not path.strip():
            raise ValueError(f"--experts entries look like NAME=PATH, got {entry!r}")
        if name.strip() in paths:
            raise ValueError(f"expert {name.strip()!r} is given twice")
        paths[name.strip()] = path.strip()
    return paths


def expert_paths(model: str, experts: str) -> dict[str, str]:
    """name -> file of "NAME=PATH,..." or of "builtin" (`model`'s shipped experts), in order.

    Raises:
        ValueError: a malformed spec, or "builtin" for a model without shipped experts.
    """
    if experts == shipped.BUILTIN:
        return shipped.builtin_paths(model)
    return parse_expert_paths(experts)


def load_named_experts(
    model: str, experts: str, cls_expert: str | None = None
) -> tuple[dict[str, experts_lib.Expert], experts_lib.Expert | None]:
    """(name -> expert, classifier) from "NAME=PATH,..." (or "builtin": `model`'s shipped
    experts) and a classification expert file (or "builtin"; None: no classifier).

    Raises:
        ValueError: a malformed spec, or "builtin" for a model without shipped experts.
        t2jax.svf.experts.ExpertError: an unreadable expert file.
    """
    paths = expert_paths(model, experts)
    if cls_expert == shipped.BUILTIN:
        cls_expert = shipped.builtin_paths(model, classifier=True)["cls"]
    loaded = {name: experts_lib.load_expert(path) for name, path in paths.items()}
    return loaded, experts_lib.load_expert(cls_expert) if cls_expert else None

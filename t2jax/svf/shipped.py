"""Experts that ship with t2jax: `t2jax/shipped_experts/MODEL/NAME.safetensors`, each with a card
(`NAME.md` for people, `NAME.json` for programs: how it was trained, on what, and its held-out
accuracy against the base model with the paired standard error).

`--experts builtin` (and `--cls-expert builtin`) name a model's shipped experts;
`t2jax expert list` shows them. MODEL is the registry name of the model they were trained on.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

SHIPPED_DIR = pathlib.Path(__file__).resolve().parents[1] / "shipped_experts"
BUILTIN = "builtin"
CLASSIFIER_NAME = "cls"


@dataclasses.dataclass(frozen=True)
class ShippedExpert:
    """A shipped expert file and its card."""

    model: str
    name: str
    path: pathlib.Path
    card: dict[str, Any]


def shipped_experts(model: str | None = None) -> list[ShippedExpert]:
    """The shipped experts (of `model`, a registry name, or of every model), sorted by model and
    name."""
    found = []
    for path in sorted(SHIPPED_DIR.glob("*/*.safetensors")):
        if model is not None and path.parent.name != model:
            continue
        card_file = path.with_suffix(".json")
        card = json.loads(card_file.read_text()) if card_file.exists() else {}
        found.append(ShippedExpert(path.parent.name, path.stem, path, card))
    return found


def model_key(model: str) -> str:
    """The shipped-experts directory name of a `--model` value: a registry name as given, a
    file or directory by its base name (lower case, without `.gguf`)."""
    return pathlib.Path(model).name.lower().removesuffix(".gguf")


def builtin_paths(model: str, *, classifier: bool = False) -> dict[str, str]:
    """{name: path} of `model`'s shipped experts: the dispatch experts (every name but "cls"), or
    with `classifier` only {"cls": path}.

    Raises:
        ValueError: the model has no shipped experts (of that kind); the message lists the models
            that do.
    """
    experts = shipped_experts(model_key(model))
    chosen = {e.name: str(e.path) for e in experts if (e.name == CLASSIFIER_NAME) == classifier}
    if not chosen:
        models = sorted({e.model for e in shipped_experts()})
        kind = "classification expert" if classifier else "experts"
        raise ValueError(
            f"no shipped {kind} for model {model!r}; shipped experts exist for: "
            f"{', '.join(models) or 'no model'} (`t2jax expert list`)"
        )
    return chosen

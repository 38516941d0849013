"""t2jax: Transformer² (self-adaptive LLMs with SVF experts) in JAX.

The public API, imported on first use (`import t2jax` itself imports no JAX):

    import t2jax
    loaded = t2jax.load_model("smollm2-135m-instruct")
    model = t2jax.adapted_model(loaded, ("mlp.up_proj",))  # SVD of the targets, cached on disk
    text = model.sampler_for(None).generate(["Hi"], max_new_tokens=8).texts  # None: base weights

(README "Python API" walks through a whole session.)

Each name is the real object of its module (`t2jax.load_model is t2jax.loading.load_model`), so
`help()` shows its own docstring. Packages hold the rest: `t2jax.svf`, `t2jax.rl`,
`t2jax.adaptation`, `t2jax.tasks`, `t2jax.plan`, `t2jax.cli`.
"""

import importlib

__version__ = "0.1.0"

# Public name -> (module, attribute).
_API = {
    "load_model": ("t2jax.loading", "load_model"),
    "Sampler": ("t2jax.sampler", "Sampler"),
    "adapted_model": ("t2jax.adapted", "adapted_model"),
    "expert_model": ("t2jax.adaptation.expert_model", "build_expert_model"),
    "load_expert": ("t2jax.svf.experts", "load_expert"),
    "save_expert": ("t2jax.svf.experts", "save_expert"),
    "mix_experts": ("t2jax.svf.experts", "mix_experts"),
    "train": ("t2jax.rl.trainer", "train"),
    "adapt": ("t2jax.adaptation.pipeline", "adapt"),
    "evaluate": ("t2jax.evaluation", "evaluate"),
}

__all__ = sorted(_API)


def __getattr__(name: str):
    """Imports a public name's module on first access (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 't2jax' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later accesses skip this hook
    return value


def __dir__() -> list[str]:
    """The module's own names and the public API."""
    return sorted(set(globals()) | set(__all__))

"""The lazy public API of the `t2jax` package."""

import importlib
import subprocess
import sys

import pytest

import t2jax


@pytest.mark.parametrize("name", t2jax.__all__)
def test_every_public_name_is_the_real_object_of_its_module(name):
    module, attribute = t2jax._API[name]
    value = getattr(t2jax, name)

    assert value is getattr(importlib.import_module(module), attribute)
    assert value.__doc__


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        t2jax.no_such_name  # noqa: B018


def test_import_t2jax_does_not_import_jax():
    code = "import sys, t2jax; print('jax' in sys.modules, t2jax.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "False"


def test_dir_lists_the_public_api():
    assert set(t2jax.__all__) <= set(dir(t2jax))
    assert "__version__" in dir(t2jax)


def test_a_session_through_the_public_api(tmp_path):
    """The README's Python API session on a tiny random model: load, decompose, apply an expert,
    generate, adapt."""
    import jax
    import jax.numpy as jnp
    import tiny

    from t2jax.adaptation.config import AdaptOptions
    from t2jax.svf import cache as svf_cache
    from t2jax.svf import core as svf_core
    from t2jax.svf import experts
    from t2jax.svf import targets as svf_targets
    from t2jax.tasks import Example

    tiny.save_tiny_checkpoint(tmp_path / "model", "qwen2_untied", seed=1)
    loaded = t2jax.load_model(str(tmp_path / "model"), dtype=jnp.float32, progress=False)
    shapes = svf_targets.svf_param_shapes(loaded.config, svf_targets.TARGET_SETS["mlp"])
    params = svf_core.init_params(jax.random.key(0), shapes, std=2.0)
    fingerprint = svf_cache.fingerprint(loaded.config, loaded.checkpoint.tensors)
    t2jax.save_expert(
        experts.expert_from_params(params, fingerprint=fingerprint),
        tmp_path / "reasoning.safetensors",
    )
    expert = t2jax.load_expert(tmp_path / "reasoning.safetensors")

    model = t2jax.expert_model(
        loaded, {"reasoning": expert}, cache_root=str(tmp_path / "svd"), progress=False
    )
    prompts = ["The sky is", "Two plus two is"]
    base = model.adapted.sampler_for(None).generate(prompts, max_new_tokens=6)
    tuned = model.adapted.sampler_for(expert.z()).generate(prompts, max_new_tokens=6)
    plain = t2jax.Sampler.for_model(loaded).generate(prompts, max_new_tokens=6)
    examples = [Example(f"q{i}", text, None) for i, text in enumerate(prompts)]
    run = t2jax.adapt(model, "prompt", examples, prompts, AdaptOptions(dispatch="likelihood"))

    assert base.token_ids == plain.token_ids  # z = None: the weights as loaded
    assert tuned.token_ids != base.token_ids  # a random expert with std 2 changes the outputs
    assert len(run.outputs) == 2 and set(run.routes) <= {"reasoning", None}
    assert all(
        category in ("code", "math", "reasoning", "other") for category in run.dispatch.categories
    )

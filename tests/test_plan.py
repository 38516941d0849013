"""Planning rules (cheap, CPU) and ahead-of-time TPU compiles of a paper model (marked aot)."""

import importlib.util
import subprocess
import sys

import jax
import pytest

from t2jax import parallel
from t2jax.config import MeshConfig
from t2jax.plan import models, rules, search
from t2jax.rl.config import RLConfig

LLAMA_8B = models.model_config("Llama-3-8B-Instruct")


def test_paper_models_have_their_published_sizes():
    billions = {
        name: models.parameter_bytes(models.model_config(name)) / 2e9
        for name in models.PAPER_MODELS
    }
    assert billions["Llama-3-8B-Instruct"] == pytest.approx(8.03, abs=0.01)
    assert billions["Llama-3-70B-Instruct"] == pytest.approx(70.6, abs=0.1)
    assert billions["Mistral-7B-Instruct-v0.3"] == pytest.approx(7.25, abs=0.01)
    assert billions["Qwen2.5-7B-Instruct"] == pytest.approx(7.6, abs=0.05)


def test_default_mesh_replicates_what_fits_and_shards_what_does_not():
    assert rules.default_mesh_shape(LLAMA_8B, 8, None) == (8, 1, 1)  # CPU: unchanged
    assert rules.default_mesh_shape(LLAMA_8B, 8, 80) == (8, 1, 1)  # H100: 15 GiB fits
    assert rules.default_mesh_shape(LLAMA_8B, 4, 16) == (1, 4, 1)  # v5e: FSDP
    llama_70b = models.model_config("Llama-3-70B-Instruct")
    assert rules.default_mesh_shape(llama_70b, 4, 95) == (1, 4, 1)


def test_rl_defaults_keep_cpu_behaviour_and_explicit_settings():
    mesh = parallel.make_mesh(MeshConfig())
    rl = rules.resolve_rl(RLConfig(), LLAMA_8B, mesh, 1024, ("mlp",))
    assert rl.microbatch_size is None and rl.remat is False  # CPU: whole batch, no remat
    explicit = RLConfig(microbatch_size=16, remat=False)
    assert rules.resolve_rl(explicit, LLAMA_8B, mesh, 1024, ("mlp",)) == explicit


def test_rl_microbatch_is_a_multiple_of_the_data_parallel_size():
    mesh = parallel.make_mesh(MeshConfig(shape=(2, 4, 1)))
    memory = rules.default_rl_memory(LLAMA_8B, mesh, 16, 1024, 256)
    assert memory.remat and memory.microbatch_size % 8 == 0 and 8 <= memory.microbatch_size <= 256


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install '.[aot]')"
)


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_llama3_8b_decode_and_rl_step_fit_v5e_4_with_the_defaults():
    """The default mesh (4-way FSDP) and RL microbatch/remat compile for 4 v5e chips (the TPU
    compiler rejects programs over HBM), and the plan's verdicts are the compiled memory's."""
    result = search.plan("Llama-3-8B-Instruct", "v5e-4", programs=("decode", "rl_merged"))
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    records = {record["program"]: record for record in result["programs"]}
    rl_tries = [record for record in result["programs"] if record["program"] == "rl_merged"]
    assert len(rl_tries) == 1, "the default RL settings needed a search"
    assert rl_tries[0]["settings"] == result["default_rl"]
    for record in records.values():
        assert record["fits"] and record["total_gib"] <= result["usable_gib"]
        assert record["arguments_gib"] < record["total_gib"]
    assert result["fits"]
    assert jax.default_backend() == "cpu"  # compiled from this CPU host
    print(search.scaling_table([result]))  # with -s: the figures of this run


def test_rules_import_none_of_the_programs():
    """Loading and training import `plan.rules` at module top: it must not pull in the sampler
    or the RL step it is a default for (an import cycle)."""
    code = (
        "import sys, t2jax.plan.rules; "
        "print(sorted(m for m in ('t2jax.sampler', 't2jax.loading', 't2jax.rl.loss', "
        "'t2jax.plan.programs') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

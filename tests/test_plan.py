"""Planning rules (cheap, CPU) and ahead-of-time TPU compiles of a paper model (marked aot)."""

import importlib.util
import subprocess
import sys

import jax
import pytest

from t2jax import parallel
from t2jax.config import MeshConfig
from t2jax.plan import models, rules, search
from t2jax.plan import programs as programs_lib
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
    # 16 v5e chips: 8.2 GiB of weights per chip even fully sharded, so heads are split too.
    assert rules.default_mesh_shape(llama_70b, 16, 16) == (1, 8, 2)


def test_sampling_search_tries_tensor_parallelism_then_fewer_rows():
    candidates = search._sampling_candidates((1, 8, 1), num_kv_heads=4, batch=32)
    assert candidates == [
        ((1, 8, 1), 32),
        ((1, 4, 2), 32),
        ((1, 2, 4), 32),  # 4 kv heads: no 8-way head split
        ((1, 2, 4), 16),
        ((1, 2, 4), 8),
        ((1, 2, 4), 4),
        ((1, 2, 4), 2),  # down to the data-parallel size (data x fsdp)
    ]


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
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason="needs jax-cuda12-plugin (pip install '.[aot]')",
)


def _last_tries(result: dict) -> dict[str, dict]:
    return {record["program"]: record for record in result["programs"]}


def _assert_defaults_fit_first_try(result: dict, programs: tuple[str, ...]) -> None:
    """Every program compiled once, with the default mesh and RL settings, and fits: the plan's
    verdicts are the compiled memory's."""
    assert [record["program"] for record in result["programs"]] == list(programs)
    assert result["mesh"] == result["default_mesh"]
    assert result["rl"] == result["default_rl"]
    for record in result["programs"]:
        assert record["fits"] and record["total_gib"] <= result["usable_gib"], record
        assert record["arguments_gib"] < record["total_gib"]
    assert result["fits"]
    assert jax.default_backend() == "cpu"  # compiled from this CPU host
    print(search.scaling_table([result]))  # with -s: the figures of this run


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_llama3_8b_decode_and_rl_step_fit_v5e_4_with_the_defaults():
    """The default mesh (4-way FSDP) and RL microbatch/remat compile for 4 v5e chips (the TPU
    compiler rejects programs over HBM)."""
    programs = ("prefill", "decode", "rl_merged")
    result = search.plan("Llama-3-8B-Instruct", "v5e-4", programs=programs)
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    _assert_defaults_fit_first_try(result, programs)


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_llama3_70b_prefill_decode_and_rl_step_fit_v5p_8_with_the_defaults():
    programs = ("prefill", "decode", "rl_merged")
    result = search.plan("Llama-3-70B-Instruct", "v5p-8", programs=programs)
    assert result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    _assert_defaults_fit_first_try(result, programs)


@pytest.mark.aot
@pytest.mark.slow
@needs_libtpu
def test_llama3_70b_prefill_on_v5e_16_needs_the_tensor_axis_and_the_plan_finds_it():
    """Weights sharded 16-way alone leave the prefill over the usable 90% of HBM; tensor
    parallelism, the default mesh there, brings it under."""
    given = search.plan(
        "Llama-3-70B-Instruct", "v5e-16", programs=("prefill",), mesh_shape=(1, 16, 1)
    )
    [prefill] = given["programs"]
    assert not given["fits"] and not prefill["fits"]
    assert prefill["total_gib"] > given["usable_gib"]  # 15.1 GiB: within HBM, not its 90%
    default = search.plan("Llama-3-70B-Instruct", "v5e-16", programs=("prefill",))
    assert default["mesh"] == {"data": 1, "fsdp": 8, "tensor": 2}
    _assert_defaults_fit_first_try(default, ("prefill",))


@pytest.mark.aot
@pytest.mark.slow
@needs_cuda_plugin
def test_llama3_8b_on_8_h100s_fits_by_its_memory_analysis():
    """Advisory: the GPU compiler accepts programs over HBM, so the verdict is XLA's per-device
    memory against 80 GB. Replicated 8B weights, decode and the RL step with the defaults."""
    programs = ("decode", "rl_merged")
    result = search.plan("Llama-3-8B-Instruct", "h100x8", programs=programs)
    assert result["device_kind"] == "NVIDIA H100 80GB HBM3"
    assert result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    _assert_defaults_fit_first_try(result, programs)


def test_gpu_plans_judge_fit_by_memory_and_say_when_nothing_fits():
    """A GPU "compile" over HBM is not an error: `measure` compares XLA's figure with HBM."""
    big = jax.jit(lambda x: x @ x.T)
    lowered = big.lower(jax.ShapeDtypeStruct((4096, 4096), jax.numpy.float32))
    memory, compiled = programs_lib.measure("toy", lambda: lowered, hbm_gib=0.01)
    assert compiled is not None and not memory.fits and memory.total_gib > 0.01
    memory, _ = programs_lib.measure("toy", lambda: lowered, hbm_gib=1.0)
    assert memory.fits


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

"""The training loop end to end on a tiny random model and a synthetic task the model can learn
(reward +1 iff the completion starts with a vowel), on the 8 fake CPU devices: the `t2jax train`
command, held-out reward rising, the run's files, and a run killed with SIGKILL that resumes to the
same expert and metrics as an uninterrupted run."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import safetensors.numpy
import svf_tiny
import tiny

from t2jax import configuration, loading
from t2jax import model as model_lib
from t2jax.adapters import core as adapters
from t2jax.adapters import peft_format
from t2jax.cli import app as cli
from t2jax.configuration import ConfigError
from t2jax.rl import config as rl_config
from t2jax.rl import rollout, trainer
from t2jax.rl import setup as rl_setup
from t2jax.rl.setup import load_splits
from t2jax.svf import experts

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_SPEC = f"{REPO}/experiments/configs/svf.py:task=synthetic_letter"
MODEL = dataclasses.replace(svf_tiny.CONFIG, vocab_size=tiny.VOCAB_SIZE)
# Sampled rollouts: the random model never starts greedily with a vowel, so greedy rollouts
# (the official default) would see no positive reward to learn from.
LEARNABLE = {
    "rl.batch_size": 16,
    "rl.samples_per_prompt": 4,
    "rl.temperature": 1.0,
    "rl.advantage": "leave_one_out",
    "rl.lr": 0.2,
    "rl.max_grad_norm": 1.0,
    "rl.microbatch_size": 16,
    "rl.logprob_chunk": 16,
    "run.progress": False,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random checkpoint whose vocabulary matches the byte-level test tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_rl_model")
    tensors = svf_tiny.random_tensors(MODEL, seed=0)
    (directory / "config.json").write_text(json.dumps(svf_tiny.hf_config(MODEL)))
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    tiny.tiny_tokenizer().save_pretrained(directory)
    return directory


def _overrides(model_dir, workdir, **extra):
    return {
        "model.name": str(model_dir),
        "svf.cache_dir": str(model_dir / "svd"),
        "run.workdir": str(workdir),
        **LEARNABLE,
        **extra,
    }


def test_train_command_learns_the_synthetic_task(model_dir, tmp_path):
    workdir = tmp_path / "run"
    overrides = _overrides(model_dir, workdir, **{"rl.num_iters": 12, "rl.eval_every": 4})
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]

    assert cli.main(["train", f"--config={CONFIG_SPEC}", *flags]) == 0

    summary = json.loads((workdir / "summary.json").read_text())
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(13))
    base, best = records[0], records[summary["best_step"]]
    assert base["eval/valid/reward"] < -0.8  # the random model rarely starts with a vowel
    assert best["eval/valid/reward"] > base["eval/valid/reward"] + 0.5  # held-out reward rises
    assert (
        summary["valid_vs_base"]["difference"]
        > 3 * summary["valid_vs_base"]["difference_standard_error"]
    )
    assert {"time/rollout", "time/score", "time/logprob_fwd_bwd", "time/update"} <= set(records[1])
    assert (workdir / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    info = json.loads((workdir / "run_info.json").read_text())
    assert info["jax_version"] == jax.__version__ and info["device_count"] == 8
    assert info["git_revision"] and info["device_kind"]
    resolved = json.loads((workdir / "config.json").read_text())
    assert resolved["rl"]["lr"] == 0.2 and resolved["task"]["name"] == "synthetic_letter"
    expert = experts.load_expert(workdir / "best_expert.safetensors")
    assert expert.targets == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert (
        expert.fingerprint == experts.load_expert(workdir / "final_expert.safetensors").fingerprint
    )


def test_next_token_training_learns_the_reference_answers_without_rollouts(model_dir, tmp_path):
    """objective=ntp trains on the reference completions ("A"): greedy (not sampled) held-out
    answers start with the letter afterwards, and no rollout is generated."""
    workdir = tmp_path / "ntp"
    extra = {"rl.objective": "ntp", "rl.num_iters": 16, "rl.eval_every": 5, "rl.temperature": 0.0}
    extra.update({"rl.samples_per_prompt": 1, "rl.advantage": "none"})
    config = configuration.resolve_config(
        rl_config.TrainConfig, CONFIG_SPEC, _overrides(model_dir, workdir, **extra)
    )
    summary = trainer.train(config)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    base, best = records[0], records[summary["best_step"]]
    assert base["eval/valid/reward"] < -0.8
    assert best["eval/valid/accuracy"] > 0.9, best
    assert records[1]["loss/loss"] > records[-1]["loss/loss"]  # the NLL of "A" falls
    assert "time/rollout" not in records[1] and "rollout/reward" not in records[1]
    assert {"time/batch", "time/logprob_fwd_bwd", "time/update"} <= set(records[1])


# A small baseline adapter on every module of the tiny model.
SMALL_ADAPTER = {"adapter.targets": "all", "adapter.rank": 4, "adapter.alpha": 8}


def _train_baseline(model_dir, workdir, **extra):
    """Trains a baseline run; (its config, summary, metrics records)."""
    config = configuration.resolve_config(
        rl_config.TrainConfig,
        CONFIG_SPEC,
        _overrides(model_dir, workdir, **SMALL_ADAPTER, **extra),
    )
    summary = trainer.train(config)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return config, summary, records


@pytest.mark.parametrize("method", ["lora", "ia3", "dora"])
def test_baselines_learn_the_reference_answers_and_export_peft_adapters(
    model_dir, tmp_path, method
):
    """method=lora|ia3|dora with objective=ntp through the same trainer: held-out greedy answers
    start with the letter afterwards; the best adapter is a PEFT directory that reads back into
    an adapter with the validation accuracy the run recorded."""
    workdir = tmp_path / method
    extra = {"rl.objective": "ntp", "rl.num_iters": 16, "rl.eval_every": 5, "rl.temperature": 0.0}
    extra.update({"rl.samples_per_prompt": 1, "rl.advantage": "none", "adapter.method": method})
    config, summary, records = _train_baseline(model_dir, workdir, **extra)
    base, best = records[0], records[summary["best_step"]]
    print(method, [r.get("eval/valid/accuracy") for r in records])
    assert base["eval/valid/reward"] < -0.8
    assert best["eval/valid/accuracy"] > 0.9, best
    assert summary["method"] == method and summary["objective"] == "ntp"
    assert summary["best_expert"] == str(workdir / "best_adapter")
    assert not list(workdir.glob("*.safetensors")), "no SVF expert files for a baseline"
    loaded = loading.load_model(str(model_dir), progress=False)
    adapter = peft_format.load_peft(workdir / "best_adapter", loaded.config)
    assert len(adapter.layers) == loaded.config.num_layers
    setup = rl_setup.load_setup(config)
    stacked = adapters.ModelAdapters(model_lib.stack_layers(adapter.layers))
    accuracy = rollout.evaluate_split(setup, stacked, "valid", setup.valid, tmp_path / "re")
    assert accuracy["eval/valid/accuracy"] == pytest.approx(best["eval/valid/accuracy"])


def test_lora_policy_gradient_learns_the_synthetic_task(model_dir, tmp_path):
    """method=lora with REINFORCE (the paper's LoRA-PG arm) on sampled rollouts (lr 0.02: LoRA's
    B starts at 0, and SVF's 0.2 makes it collapse here as in the paper's Figure 9)."""
    workdir = tmp_path / "lora_rl"
    extra = {"rl.num_iters": 12, "rl.eval_every": 4, "adapter.method": "lora", "rl.lr": 0.02}
    _, summary, records = _train_baseline(model_dir, workdir, **extra)
    base, best = records[0], records[summary["best_step"]]
    print([r.get("eval/valid/reward") for r in records])
    assert best["eval/valid/reward"] > base["eval/valid/reward"] + 0.5
    assert (
        "time/rollout" in records[1]
        and (workdir / "final_adapter" / "adapter_config.json").exists()
    )


def test_next_token_training_needs_reference_solutions(model_dir, tmp_path):
    config = configuration.resolve_config(
        rl_config.TrainConfig,
        f"{REPO}/experiments/configs/svf.py:task=math",
        {
            **_overrides(model_dir, tmp_path / "math"),
            "rl.objective": "ntp",
            "task.train_split": "test",
            "task.valid_split": "math500",
            "task.test_split": None,
        },
    )
    with pytest.raises(ConfigError, match="math has no reference solutions"):
        trainer.train(config)


def _latest_checkpoint(workdir: pathlib.Path) -> int:
    directory = workdir / "checkpoints"
    steps = (
        [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    )
    return max(steps, default=0)


def _kill_after_checkpoint(command, env, workdir, step, timeout=240.0):
    """Starts `command`, SIGKILLs it as soon as checkpoint `step` is on disk; returns the step
    the run had reached."""
    log = workdir.parent / f"{workdir.name}.stderr"  # a file: a full pipe would block the run
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + timeout
    try:
        while _latest_checkpoint(workdir) < step:
            if process.poll() is not None:
                pytest.fail(f"training exited early: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint in time: {log.read_text()[-3000:]}")
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    return _latest_checkpoint(workdir)


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_killed_run_resumes_to_the_same_expert_and_metrics(model_dir, tmp_path):
    extra = {"rl.num_iters": 6, "rl.eval_every": 2}
    complete = configuration.resolve_config(
        rl_config.TrainConfig, CONFIG_SPEC, _overrides(model_dir, tmp_path / "a", **extra)
    )
    killed = configuration.with_overrides(complete, {"run.workdir": str(tmp_path / "b")})
    command = [
        sys.executable,
        str(REPO / "experiments" / "train_svf.py"),
        f"--config={CONFIG_SPEC}",
        *[f"--config.{k}={v}" for k, v in _overrides(model_dir, tmp_path / "b", **extra).items()],
    ]

    reached = _kill_after_checkpoint(command, dict(os.environ), tmp_path / "b", step=3)
    assert 3 <= reached < 6 and not (tmp_path / "b" / "summary.json").exists()
    assert experts.load_expert(tmp_path / "b" / "latest_expert.safetensors").targets  # usable
    uninterrupted = trainer.train(complete)
    resumed = trainer.train(killed)

    final = experts.load_expert(tmp_path / "a" / "final_expert.safetensors").params
    latest = experts.load_expert(tmp_path / "a" / "latest_expert.safetensors").params
    assert all(np.array_equal(latest[key], final[key]) for key in final)
    for name in ("best_expert.safetensors", "final_expert.safetensors"):
        a = experts.load_expert(tmp_path / "a" / name).params
        b = experts.load_expert(tmp_path / "b" / name).params
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)
    assert resumed["best_step"] == uninterrupted["best_step"]
    records = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("a", "b")
    ]
    assert [r["step"] for r in records[1]] == list(range(7))
    for a, b in zip(*map(_comparable, records), strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], rtol=1e-5, atol=1e-6)

    again = trainer.train(complete)  # a finished run only re-exports and re-summarizes
    assert again["steps"] == 6 and again["best_step"] == uninterrupted["best_step"]
    changed = configuration.with_overrides(complete, {"rl.lr": 0.01})  # same workdir, other config
    with pytest.raises(ConfigError, match="different rl config"):
        trainer.train(changed)


def test_load_splits_limits_and_seeded_valid_sample():
    section = rl_config.TaskSection(name="synthetic_letter", train_limit=10, eval_train_limit=4)
    task, train, eval_train, valid, test = load_splits(section)
    all_valid = task.load("valid", None)
    assert len(train) == 10 and eval_train == train[:4] and test == []
    assert valid == all_valid

    sampled = dataclasses.replace(section, valid_sample=8, test_split="test", test_limit=3)
    _, _, _, valid, test = load_splits(sampled)
    assert len(valid) == 8 and valid != all_valid[:8] and len(test) == 3
    positions = [all_valid.index(example) for example in valid]
    assert positions == sorted(positions)  # split order kept
    assert valid == load_splits(sampled)[3]  # seeded


def test_older_run_configs_resume_and_changed_ones_do_not(tmp_path):
    """A run directory written before a section or field existed resumes (its default is what the
    run had), so does one that computed the same gradient another way (the official merged mode,
    no remat); a run with another method does not."""
    from t2jax import parallel
    from t2jax.config import MeshConfig
    from t2jax.rl.run_dir import CONFIG_FILE, RunDirectory

    mesh = parallel.make_mesh(MeshConfig(shape=(-1, 1, 1)))
    older = configuration.to_dict(rl_config.TrainConfig())
    del older["adapter"]
    del older["rl"]["objective"]
    older["svf"]["mode"] = "merged"
    older["rl"]["remat"] = True
    (tmp_path / CONFIG_FILE).write_text(json.dumps(older))
    files = RunDirectory(tmp_path, is_main=True)
    files.write_config(rl_config.TrainConfig(), mesh)  # resumes
    lora = configuration.with_overrides(rl_config.TrainConfig(), {"adapter.method": "lora"})
    with pytest.raises(ConfigError, match="different adapter config"):
        files.write_config(lora, mesh)

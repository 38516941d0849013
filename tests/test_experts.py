"""Expert files (safetensors, orbax, official .pt), validation, mixing, transfer, and the CLI."""

import argparse
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
import safetensors.numpy
import svf_tiny

from t2jax.cli import svf as svf_cli
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib
from t2jax.svf import targets as svf_targets

CONFIG = svf_tiny.CONFIG
MLP = svf_targets.TARGET_SETS["mlp"]


def _expert(seed, targets=MLP, fingerprint="feedfacefeedface", parametrization=None):
    parametrization = parametrization or svf_lib.OFFICIAL_PARAMETRIZATION
    shapes = svf_targets.svf_param_shapes(CONFIG, targets)
    params = svf_lib.init_params(jax.random.key(seed), shapes, parametrization, std=0.5)
    return experts_lib.expert_from_params(params, parametrization, fingerprint)


def _assert_same_expert(found, expected):
    assert found.parametrization == expected.parametrization
    assert found.fingerprint == expected.fingerprint
    assert found.targets == expected.targets
    for key in expected.params:
        np.testing.assert_array_equal(found.params[key], expected.params[key])


@pytest.mark.parametrize("suffix", [".safetensors", "_orbax"])
def test_save_load_round_trip(tmp_path, suffix):
    plain = svf_lib.Parametrization("plain")
    for expert in (_expert(0), _expert(1, svf_targets.resolve_targets("qv"), None, plain)):
        path = tmp_path / f"{expert.parametrization.kind}{suffix}"
        experts_lib.save_expert(expert, path)
        _assert_same_expert(experts_lib.load_expert(path), expert)


def test_safetensors_file_is_keyed_by_hf_names(tmp_path):
    expert = _expert(0)
    experts_lib.save_safetensors(expert, tmp_path / "e.safetensors")
    tensors = safetensors.numpy.load_file(str(tmp_path / "e.safetensors"))
    assert sorted(tensors) == sorted(
        svf_targets.hf_tensor_name(layer, key) for layer in range(CONFIG.num_layers) for key in MLP
    )
    np.testing.assert_array_equal(
        tensors["model.layers.1.mlp.down_proj.weight"], expert.params["mlp.down_proj"][1]
    )


def test_saving_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "e.safetensors"
    experts_lib.save_expert(_expert(0), path)
    experts_lib.save_expert(_expert(1), path)  # overwrite: no temporary left behind
    _assert_same_expert(experts_lib.load_expert(path), _expert(1))

    def crash(tensors, filename, metadata):
        pathlib.Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        experts_lib.save_expert(_expert(2), path)
    _assert_same_expert(experts_lib.load_expert(path), _expert(1))
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


def test_unreadable_file_is_an_expert_error(tmp_path):
    path = tmp_path / "e.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(experts_lib.ExpertError, match="not a readable safetensors file"):
        experts_lib.load_expert(path)


def _write(path, tensors, **metadata_changes):
    metadata = experts_lib._metadata(_expert(0))
    metadata.update(metadata_changes)
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(drop="model.layers.1.mlp.up_proj.weight"), "lacks the vectors of layers"),
        (dict(rename=("model.layers.1.mlp.up_proj.weight", "lm_head.weight")), "not the HF name"),
        (dict(reshape="model.layers.0.mlp.up_proj.weight"), "expected a vector"),
        (dict(truncate="model.layers.1.mlp.up_proj.weight"), "different lengths"),
        (dict(metadata={"format": "something"}), "not a t2jax expert"),
        (dict(metadata={"targets": "mlp.up_proj"}), "metadata lists targets"),
        (dict(metadata={"parametrization": "tanh"}), "bad parametrization"),
        (dict(metadata={"num_layers": "7"}), "num_layers"),
        (dict(nan="model.layers.0.mlp.gate_proj.weight"), "NaN"),
    ],
)
def test_untrusted_files_are_validated(tmp_path, change, message):
    tensors = experts_lib.expert_tensors(_expert(0))
    if "drop" in change:
        del tensors[change["drop"]]
    if "rename" in change:
        old, new = change["rename"]
        tensors[new] = tensors.pop(old)
    if "reshape" in change:
        tensors[change["reshape"]] = tensors[change["reshape"]].reshape(2, -1)
    if "truncate" in change:
        tensors[change["truncate"]] = tensors[change["truncate"]][:-1]
    if "nan" in change:
        tensors[change["nan"]] = np.full_like(tensors[change["nan"]], np.nan)
    _write(tmp_path / "bad.safetensors", tensors, **change.get("metadata", {}))
    with pytest.raises(experts_lib.ExpertError, match=message):
        experts_lib.load_expert(tmp_path / "bad.safetensors")


def test_compatibility_checks(tmp_path):
    tensors, _, fingerprint = svf_tiny.model(seed=0)
    factors = svf_tiny.factors(tensors, fingerprint)
    mine = dataclasses.replace(_expert(0), fingerprint=fingerprint)
    experts_lib.check_compatible(mine, factors)

    other_model = _expert(0)
    with pytest.raises(svf_cache.FingerprintError, match="another model"):
        experts_lib.check_compatible(other_model, factors)
    experts_lib.check_compatible(other_model, factors, allow_other_model=True)
    unknown = dataclasses.replace(other_model, fingerprint=None)
    experts_lib.check_compatible(unknown, factors)

    with pytest.raises(experts_lib.ExpertError, match="factors cover"):
        experts_lib.check_compatible(_expert(0, svf_targets.resolve_targets("qv")), factors)
    deeper = dataclasses.replace(CONFIG, num_layers=CONFIG.num_layers + 1)
    with pytest.raises(experts_lib.ExpertError, match="layers"):
        experts_lib.check_shapes(mine, deeper)


@pytest.mark.torch
def test_import_of_official_policy_params_and_legacy_files(tmp_path):
    torch = pytest.importorskip("torch")
    expected = _expert(3, fingerprint=None)
    order = [(layer, key) for layer in range(CONFIG.num_layers) for key in MLP]  # state-dict order

    def vector(layer, key):
        return torch.tensor(expected.params[key][layer]).to(torch.bfloat16)

    policy_params = {
        f"learnable_params_module_list.{i}": vector(*item) for i, item in enumerate(order)
    }
    legacy = {f"module.{svf_targets.hf_tensor_name(*item)}": vector(*item) for item in order}
    for name, state in (("policy_params.pt", policy_params), ("learnable_params.pt", legacy)):
        torch.save(state, tmp_path / name)
        imported = experts_lib.import_official(tmp_path / name, CONFIG)
        assert imported.parametrization == svf_lib.Parametrization("sigmoid", 1.0)
        assert imported.fingerprint is None
        for key in MLP:  # bf16 storage, as in the official code
            np.testing.assert_allclose(imported.params[key], expected.params[key], rtol=1e-2)
        z = imported.z()["mlp.up_proj"]
        np.testing.assert_allclose(z, jax.nn.sigmoid(imported.params["mlp.up_proj"]), rtol=1e-6)

    del policy_params[f"learnable_params_module_list.{len(order) - 1}"]
    torch.save(policy_params, tmp_path / "short.pt")
    with pytest.raises(experts_lib.ExpertError, match="needs"):
        experts_lib.import_official(tmp_path / "short.pt", CONFIG)
    torch.save({"optimizer.step": torch.zeros(())}, tmp_path / "odd.pt")
    with pytest.raises(experts_lib.ExpertError, match="unrecognized key"):
        experts_lib.import_official(tmp_path / "odd.pt", CONFIG)
    with pytest.raises(experts_lib.ExpertError, match="import_official"):
        experts_lib.load_expert(tmp_path / "odd.pt")


def test_mixing_experts_one_hot_and_spaces():
    experts = [_expert(seed) for seed in range(3)]
    for k, expert in enumerate(experts):
        one_hot = np.eye(3, dtype=np.float32)[k]
        mixed = experts_lib.mix_experts(experts, one_hot)
        assert mixed.parametrization.kind == "plain"
        assert mixed.fingerprint == expert.fingerprint
        for key, z in expert.z().items():
            np.testing.assert_allclose(mixed.params[key], z, rtol=1e-6)
        raw = experts_lib.mix_experts(experts, one_hot, space="p")  # the official CEM's behaviour
        for key, p in expert.params.items():
            np.testing.assert_allclose(raw.params[key], p, rtol=1e-6)

    strangers = [experts[0], dataclasses.replace(experts[1], fingerprint="0" * 16)]
    with pytest.raises(experts_lib.ExpertError, match="different models"):
        experts_lib.mix_experts(strangers, np.ones(2))
    with pytest.raises(experts_lib.ExpertError, match="different matrices"):
        experts_lib.mix_experts(
            [experts[0], _expert(5, svf_targets.resolve_targets("qv"))], np.ones(2)
        )


def test_transfer_and_shuffled_control():
    expert = _expert(0)
    moved = experts_lib.transfer(expert, CONFIG, "b" * 16)
    assert moved.fingerprint == "b" * 16
    _assert_same_expert(moved, dataclasses.replace(expert, fingerprint="b" * 16))

    shuffled = experts_lib.transfer(expert, CONFIG, "b" * 16, shuffle=True, seed=1)
    for key in MLP:
        for layer in range(CONFIG.num_layers):
            original, permuted = expert.params[key][layer], shuffled.params[key][layer]
            np.testing.assert_array_equal(np.sort(permuted), np.sort(original))
            assert not np.array_equal(permuted, original)
    again = experts_lib.transfer(expert, CONFIG, "b" * 16, shuffle=True, seed=1)
    other_seed = experts_lib.transfer(expert, CONFIG, "b" * 16, shuffle=True, seed=2)
    np.testing.assert_array_equal(again.params["mlp.up_proj"], shuffled.params["mlp.up_proj"])
    assert not np.array_equal(other_seed.params["mlp.up_proj"], shuffled.params["mlp.up_proj"])

    wider = dataclasses.replace(CONFIG, hidden_size=40, head_dim=10)
    with pytest.raises(experts_lib.ExpertError, match="ranks do not match"):
        experts_lib.transfer(expert, wider, "c" * 16)


def _run_cli(*argv):
    parser = argparse.ArgumentParser(prog="t2jax")
    svf_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(arg) for arg in argv])
    assert args.func(args) == 0


def test_cli_params_shape_only(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(svf_tiny.LLAMA3_8B))
    _run_cli("params", "--model", tmp_path / "config.json")
    assert "SVF trainable parameters: 393,216" in capsys.readouterr().out
    _run_cli("params", "--model", tmp_path / "config.json", "--targets", "qv", "--lora-rank", 16)
    out = capsys.readouterr().out
    assert "SVF trainable parameters: 163,840" in out
    assert "LoRA rank 16 on the same matrices: 6,815,744" in out


def test_cli_decompose_info_mix_transfer(tmp_path, capsys):
    tensors = svf_tiny.save_hf_dir(tmp_path / "model_a", seed=0)
    svf_tiny.save_hf_dir(tmp_path / "model_b", seed=1)
    fingerprint = svf_cache.fingerprint(CONFIG, tensors)
    cache = tmp_path / "cache"
    _run_cli("decompose", "--model", tmp_path / "model_a", "--cache-dir", cache, "--no-progress")
    assert fingerprint in capsys.readouterr().out
    svf_cache.load_factors(cache / fingerprint, CONFIG, MLP, fingerprint=fingerprint)

    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"e{seed}.safetensors")
        experts_lib.save_expert(_expert(seed, fingerprint=fingerprint), paths[-1])
    _run_cli("expert", "info", paths[0])
    info = capsys.readouterr().out
    assert "parametrization: sigmoid" in info and "mlp.down_proj: R=32" in info

    mixed_path = tmp_path / "mixed.safetensors"
    _run_cli(
        "expert", "mix", "--experts", f"{paths[0]},{paths[1]}", "--alpha", "0,1",
        "--out", mixed_path,
    )  # fmt: skip
    np.testing.assert_allclose(
        experts_lib.load_expert(mixed_path).params["mlp.up_proj"],
        experts_lib.load_expert(paths[1]).z()["mlp.up_proj"],
        rtol=1e-6,
    )

    moved_path = tmp_path / "moved.safetensors"
    _run_cli(
        "expert", "transfer", "--expert", paths[0], "--model", tmp_path / "model_b",
        "--shuffle", "--seed", 3, "--out", moved_path,
    )  # fmt: skip
    moved = experts_lib.load_expert(moved_path)
    assert moved.fingerprint == svf_cache.fingerprint(CONFIG, svf_tiny.random_tensors(seed=1))
    assert not np.array_equal(moved.params["mlp.up_proj"], _expert(0).params["mlp.up_proj"])

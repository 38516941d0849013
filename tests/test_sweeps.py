"""Configs and sweeps: typed configs from config files with dotted overrides (argparse and absl
`config_flags`), validation errors, grid expansion, deterministic run names, the manifest, and a
sweep that skips finished runs, resumes partial ones and records failures."""

import json
import pathlib
import shlex

import pytest
from absl import flags
from ml_collections import config_flags

from t2jax import configuration, sweeps
from t2jax.cli import app as cli
from t2jax.cli import options as cli_options
from t2jax.configuration import ConfigError
from t2jax.rl import config as rl_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "experiments" / "configs" / "svf.py"


def test_config_file_arguments_and_presets():
    official = configuration.resolve_config(
        rl_config.TrainConfig, f"{CONFIG_FILE}:model=my-model,task=arc_easy"
    )
    cpu = configuration.resolve_config(
        rl_config.TrainConfig, f"{CONFIG_FILE}:task=arc_easy,preset=cpu"
    )

    assert official.model.name == "my-model" and official.task.name == "arc_easy"
    assert official.rl == rl_config.RLConfig()  # the official recipe
    assert (official.rl.lr, official.rl.max_grad_norm, official.rl.batch_size) == (2e-3, 1e-3, 256)
    assert (official.rl.seed, official.rl.eval_every, official.rl.temperature) == (42, 10, 0.0)
    assert cpu.rl.batch_size == 32 and cpu.task.max_new_tokens == 128
    assert cpu.run.workdir == "runs/svf/arc_easy-smollm2-135m-instruct-cpu"
    with pytest.raises(ValueError, match="unknown config argument"):
        configuration.load_config_file(f"{CONFIG_FILE}:modle=x")
    with pytest.raises(ConfigError, match="does not exist"):
        configuration.load_config_file("nowhere.py:task=gsm8k")


def test_dotted_overrides_are_typed_and_validated():
    config = configuration.with_overrides(
        rl_config.TrainConfig(),
        {
            "rl.lr": "1e-3",
            "rl.microbatch_size": "16",
            "task.valid_limit": "none",
            "rl.length_normalize": "true",
            "model.mesh.shape": "2,4,1",
            "svf.parametrization.kind": "plain",
        },
    )

    assert config.rl.lr == 1e-3 and config.rl.microbatch_size == 16
    assert config.task.valid_limit is None and config.rl.length_normalize is True
    assert config.model.mesh.shape == (2, 4, 1) and config.svf.parametrization.kind == "plain"
    assert configuration.from_dict(rl_config.TrainConfig, configuration.to_dict(config)) == config
    for overrides, message in (
        ({"rl.lrr": "1e-3"}, "unknown config key 'rl.lrr'"),
        ({"rl.lr": "fast"}, "rl.lr must be float"),
        ({"rl.lr": "-1"}, "rl.lr must be positive"),
        ({"rl.kl_direction": "both"}, "rl.kl_direction='both' is not one of"),
        ({"rl.advantage": "leave_one_out"}, "needs rl.samples_per_prompt > 1"),
        ({"rl.samples_per_prompt": "4"}, "needs rl.temperature > 0"),
        ({"svf.mode": "dense"}, "svf.mode='dense'"),
        ({"model.mesh.shape": "-1,-1,1"}, "at most one mesh axis may be -1"),
        ({"task.valid_limit": "5", "task.valid_sample": "5"}, "exclude each other"),
    ):
        with pytest.raises(ConfigError, match=message):
            configuration.with_overrides(rl_config.TrainConfig(), overrides)


def test_absl_config_flags_parse_the_same_overrides(monkeypatch):
    argv = [
        "train_svf",
        f"--config={CONFIG_FILE}:task=gsm8k",
        "--config.rl.lr=0.001",
        "--config.task.valid_limit=50",  # None by default: a typed placeholder
        "--config.model.mesh.shape=(2, 4, 1)",
    ]
    monkeypatch.setattr("sys.argv", argv)  # config_flags finds the overrides in sys.argv
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=values)
    values(argv)

    config = configuration.from_config_dict(rl_config.TrainConfig, holder.value)

    expected = {"rl.lr": 1e-3, "task.valid_limit": 50, "model.mesh.shape": (2, 4, 1)}
    assert config == configuration.with_overrides(
        configuration.resolve_config(rl_config.TrainConfig, f"{CONFIG_FILE}:task=gsm8k"), expected
    )


def test_train_command_line_options_cover_every_config_leaf():
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "train",
            f"--config={CONFIG_FILE}:task=gsm8k",
            "--config.rl.lr=1e-3",
            "--config.run.workdir",
            "runs/x",
            "--config.task.test_split=test",
        ]
    )

    assert cli_options.overrides_from_args(args) == {
        "rl.lr": "1e-3",
        "run.workdir": "runs/x",
        "task.test_split": "test",
    }
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for path in configuration.leaf_types(rl_config.TrainConfig):
        assert f"--config.{path}" in help_text


def test_grid_and_deterministic_run_names():
    entries = sweeps.grid({"rl.lr": [1e-3, 2e-3], "rl.seed": [1, 2], "svf.mode": ["merged"]})

    assert entries[1] == {"rl.lr": 1e-3, "rl.seed": 2, "svf.mode": "merged"}
    assert [sweeps.run_name(e) for e in entries] == [
        "lr0.001-seed1-modemerged",
        "lr0.001-seed2-modemerged",
        "lr0.002-seed1-modemerged",
        "lr0.002-seed2-modemerged",
    ]
    assert (
        sweeps.run_name({"task.name": "a/b c", "model.name": "m"}) == "task_namea_b_c-model_namem"
    )
    assert sweeps.run_name({"model.mesh.shape": (2, 4, 1), "rl.length_normalize": True}) == (
        "shape2x4x1-length_normalizetrue"
    )
    with pytest.raises(ConfigError, match="same overrides"):
        sweeps.expand([{"rl.lr": 1e-3}, {"rl.lr": 1e-3}], "root")
    with pytest.raises(ConfigError, match=r"must not set run\.workdir"):
        sweeps.expand([{"run.workdir": "x"}], "root")


def _write_sweep(directory: pathlib.Path) -> pathlib.Path:
    path = directory / "lr_sweep.py"
    path.write_text(
        "from t2jax.sweeps import grid\n"
        f"CONFIG = {str(CONFIG_FILE) + ':task=gsm8k'!r}\n"
        "def sweep():\n"
        "    return grid({'rl.lr': [0.001, 0.002, 0.003]})\n"
    )
    return path


def test_sweep_runs_resumes_and_records_failures(tmp_path):
    sweep_file = _write_sweep(tmp_path)
    root = tmp_path / "runs"
    calls = []

    def fake_train(config):
        calls.append(config.run.workdir)
        workdir = pathlib.Path(config.run.workdir)
        if config.rl.lr == 0.003:
            raise RuntimeError("out of memory")
        (workdir / "checkpoints" / "3").mkdir(parents=True)  # a partial run...
        if config.rl.lr == 0.001:
            (workdir / "summary.json").write_text("{}")  # ...that this time finishes

    records = sweeps.run_sweep(sweep_file, root, run_fn=fake_train)

    assert [r["name"] for r in records] == ["lr0.001", "lr0.002", "lr0.003"]
    assert [r["status"] for r in records] == ["finished", "partial", "failed"]
    assert records[2]["error"] == "RuntimeError: out of memory"
    assert records[1]["workdir"] == str(root / "lr0.002")
    manifest = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert manifest == records

    calls.clear()
    sweeps.run_sweep(sweep_file, root, run_fn=fake_train)  # relaunch: skip the finished run
    assert calls == [str(root / "lr0.002"), str(root / "lr0.003")]


def test_manifest_commands_reproduce_each_run_config(tmp_path):
    sweep_file = _write_sweep(tmp_path)
    records = sweeps.run_sweep(sweep_file, tmp_path / "runs", dry_run=True)
    sweep = sweeps.load_sweep(sweep_file)

    assert [r["status"] for r in records] == ["pending"] * 3
    for record, run in zip(records, sweeps.expand(sweep.entries, tmp_path / "runs"), strict=True):
        argv = shlex.split(record["command"])
        assert argv[:2] == ["t2jax", "train"]
        args = cli.build_parser().parse_args(argv[1:])
        from_command = configuration.resolve_config(
            rl_config.TrainConfig, args.config, cli_options.overrides_from_args(args)
        )
        assert from_command == sweeps.run_config(sweep, run)


def test_bad_sweep_files(tmp_path):
    (tmp_path / "empty.py").write_text("CONFIG = 'x.py'\ndef sweep():\n    return []\n")
    (tmp_path / "nothing.py").write_text("X = 1\n")
    (tmp_path / "typo.py").write_text(
        f"CONFIG = {str(CONFIG_FILE)!r}\ndef sweep():\n    return [{{'rl.lrate': 1.0}}]\n"
    )
    with pytest.raises(ConfigError, match="defines no runs"):
        sweeps.load_sweep(tmp_path / "empty.py")
    with pytest.raises(ConfigError, match="must define CONFIG"):
        sweeps.load_sweep(tmp_path / "nothing.py")
    with pytest.raises(ConfigError, match=r"unknown config key 'rl\.lrate'"):
        sweeps.run_sweep(tmp_path / "typo.py", tmp_path / "runs", dry_run=True)
    assert not (tmp_path / "runs").exists()  # invalid sweeps fail before writing anything


def test_shipped_sweeps_expand_to_valid_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # their CONFIG paths are relative to the repository root
    for sweep_file in sorted((REPO / "experiments" / "sweeps").glob("*.py")):
        records = sweeps.run_sweep(sweep_file, tmp_path / sweep_file.stem, dry_run=True)
        assert records and len({r["name"] for r in records}) == len(records)


def test_adaptation_sweep_with_shared_overrides(tmp_path):
    from t2jax.cli import adapt as adapt_cli

    adapt_file = REPO / "experiments" / "configs" / "adapt.py"
    sweep_file = tmp_path / "fewshot_sweep.py"
    sweep_file.write_text(
        "from t2jax.sweeps import grid\n"
        "COMMAND = 'adapt'\n"
        f"CONFIG = {str(adapt_file) + ':task=math,strategy=fewshot,preset=cpu'!r}\n"
        "OVERRIDES = {'experts': 'math=m.safetensors,code=c.safetensors'}\n"
        "def sweep():\n"
        "    return grid({'options.few_shot.generations': [1, 2]})\n"
    )
    root = tmp_path / "runs"
    seen = []

    def fake_adapt(config):
        seen.append(config)
        (pathlib.Path(config.run.workdir) / "summary.json").parent.mkdir(parents=True)
        (pathlib.Path(config.run.workdir) / "summary.json").write_text("{}")

    records = sweeps.run_sweep(sweep_file, root, run_fn=fake_adapt)

    assert [r["name"] for r in records] == ["generations1", "generations2"]
    assert [r["status"] for r in records] == ["finished", "finished"]
    assert [c.options.few_shot.generations for c in seen] == [1, 2]
    assert all(c.experts == "math=m.safetensors,code=c.safetensors" for c in seen)
    assert seen[1].run.workdir == str(root / "generations2")
    sweep = sweeps.load_sweep(sweep_file)
    for record, config in zip(records, seen, strict=True):
        argv = shlex.split(record["command"])
        assert argv[:2] == ["t2jax", "adapt"]
        assert adapt_cli.adapt_config(cli.build_parser().parse_args(argv[1:])) == config
    with pytest.raises(ConfigError, match="COMMAND must be one of"):
        sweep_file.write_text(sweep_file.read_text().replace("'adapt'", "'serve'"))
        sweeps.load_sweep(sweep_file)
    assert sweep.command == "adapt"

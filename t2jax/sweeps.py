"""Sweeps: a grid of config overrides expanded into training or adaptation runs with deterministic
names, a manifest, and resumable sequential execution (anchors-style section 6.9).

A sweep file is a Python module with
    COMMAND = "train"  # or "adapt" (default "train")
    CONFIG = "experiments/configs/svf.py:model=qwen2.5-coder-0.5b-instruct,task=gsm8k"
    OVERRIDES = {"rl.num_iters": 100}  # optional: set for every run, not part of run names
    def sweep():  # -> list of {dotted config key: value}
        return sweeps.grid({"rl.kl_coeff": [0.0, 0.1, 0.2, 0.3], "rl.seed": [42]})

Each entry becomes a run named by its overrides ("kl_coeff0.1-seed42") in ROOT/NAME (its
`run.workdir`). `ROOT/manifest.jsonl` lists every run with its overrides, workdir, the equivalent
`t2jax train` / `t2jax adapt` command line and its status: "finished" (summary.json written),
"partial" (training checkpoints exist; the next launch resumes it), "pending", or "failed" (with
the error). Running a sweep again skips finished runs and resumes partial ones, so a preempted
machine can simply relaunch it.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import logging
import os
import pathlib
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from t2jax import parallel
from t2jax.adaptation.config import AdaptConfig
from t2jax.configuration import ConfigError, load_python_file, resolve_config
from t2jax.files import write_text_atomically
from t2jax.rl.config import TrainConfig

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.jsonl"
MAX_NAME_LENGTH = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclasses.dataclass(frozen=True)
class Command:
    """What a sweep runs: a config class and the function that runs one config (imported when
    the first run starts)."""

    config_class: type
    module: str
    function: str

    def resolve(self, config_spec: str, overrides: Mapping[str, Any]) -> Any:
        """The validated config of a config file spec plus dotted overrides."""
        config = resolve_config(self.config_class, config_spec, overrides)
        return config.validate() if hasattr(config, "validate") else config

    def runner(self) -> Callable[[Any], Any]:
        """The function that runs a config."""
        return getattr(importlib.import_module(self.module), self.function)


COMMANDS = {
    "train": Command(TrainConfig, "t2jax.rl.trainer", "train"),
    "adapt": Command(AdaptConfig, "t2jax.adaptation.run", "run_adapt"),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep."""

    name: str
    overrides: dict[str, Any]
    workdir: str


def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, the last axis varying fastest.

    >>> grid({"rl.lr": [1e-3, 2e-3], "rl.seed": [1, 2]})[1]
    {'rl.lr': 0.001, 'rl.seed': 2}
    """
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "x".join(_format_value(item) for item in value)
    return str(value)


def run_name(overrides: Mapping[str, Any]) -> str:
    """A deterministic, file-system-safe name from the overrides, in their order: each key's last
    component (the full dotted path when two keys share it) followed by its value."""
    leaves = [key.rsplit(".", 1)[-1] for key in overrides]
    parts = []
    for key, leaf in zip(overrides, leaves, strict=True):
        label = leaf if leaves.count(leaf) == 1 else key.replace(".", "_")
        parts.append(label + _format_value(overrides[key]))
    name = _UNSAFE.sub("_", "-".join(parts)) or "default"
    return name[:MAX_NAME_LENGTH]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep file's contents: what it runs, the config file spec, the overrides every run
    shares and the override entries (one per run)."""

    command: str
    config: str
    common: dict[str, Any]
    entries: list[dict[str, Any]]


def load_sweep(path: str | os.PathLike) -> Sweep:
    """The COMMAND, CONFIG spec, OVERRIDES and run entries of a sweep file.

    Raises:
        ConfigError: the file is missing, lacks CONFIG or sweep(), names an unknown COMMAND, or
            returns no runs.
    """
    file = pathlib.Path(path)
    module = load_python_file(file, "sweep")
    if not isinstance(getattr(module, "CONFIG", None), str) or not callable(
        getattr(module, "sweep", None)
    ):
        raise ConfigError(f"sweep file {str(file)!r} must define CONFIG (str) and sweep()")
    command = getattr(module, "COMMAND", "train")
    if command not in COMMANDS:
        raise ConfigError(f"sweep file {str(file)!r}: COMMAND must be one of {sorted(COMMANDS)}")
    entries = [dict(entry) for entry in module.sweep()]
    if not entries:
        raise ConfigError(f"sweep file {str(file)!r} defines no runs")
    return Sweep(command, module.CONFIG, dict(getattr(module, "OVERRIDES", {})), entries)


def expand(entries: Sequence[Mapping[str, Any]], root: str | os.PathLike) -> list[Run]:
    """Runs of the override entries, in ROOT/NAME.

    Raises:
        ConfigError: two entries get the same name, or an entry sets run.workdir.
    """
    runs = []
    for entry in entries:
        if "run.workdir" in entry:
            raise ConfigError("sweep entries must not set run.workdir: the sweep names runs")
        name = run_name(entry)
        runs.append(Run(name, dict(entry), str(pathlib.Path(root) / name)))
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"sweep entries with the same overrides: {duplicates}")
    return runs


def run_config(sweep: Sweep, run: Run) -> Any:
    """The validated config of a run (the sweep's config file, the run's overrides, its
    workdir)."""
    overrides = {**sweep.common, **run.overrides, "run.workdir": run.workdir}
    return COMMANDS[sweep.command].resolve(sweep.config, overrides)


def command_line(sweep: Sweep, run: Run) -> str:
    """The `t2jax train` / `t2jax adapt` command that runs (or resumes) `run` on its own, e.g. on
    another VM."""
    flags = [f"--config={sweep.config}"]
    overrides = {**sweep.common, **run.overrides}
    flags += [f"--config.{key}={_format_override(value)}" for key, value in overrides.items()]
    flags.append(f"--config.run.workdir={run.workdir}")
    return shlex.join(["t2jax", sweep.command, *flags])


def _format_override(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_format_override(item) for item in value)
    if value is None:
        return "none"
    return _format_value(value)


def run_status(run: Run) -> str:
    """ "finished", "partial" (checkpoints exist) or "pending", from the run's directory."""
    workdir = pathlib.Path(run.workdir)
    if (workdir / "summary.json").exists():
        return "finished"
    checkpoints = workdir / "checkpoints"
    if checkpoints.is_dir() and any(path.name.isdigit() for path in checkpoints.iterdir()):
        return "partial"
    return "pending"


def write_manifest(
    root: str | os.PathLike,
    sweep: Sweep,
    runs: Sequence[Run],
    errors: Mapping[str, str] | None = None,
) -> pathlib.Path:
    """Writes ROOT/manifest.jsonl (atomically, main process only): one line per run with its
    current status."""
    errors = errors or {}
    root = pathlib.Path(root)
    if not parallel.is_main_process():
        return root / MANIFEST_FILE
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for run in runs:
        record = {
            "name": run.name,
            "workdir": run.workdir,
            "overrides": run.overrides,
            "config": sweep.config,
            "command": command_line(sweep, run),
            "status": "failed" if run.name in errors else run_status(run),
        }
        if run.name in errors:
            record["error"] = errors[run.name]
        lines.append(json.dumps(record, sort_keys=True))
    path = root / MANIFEST_FILE
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path


def run_sweep(
    sweep_file: str | os.PathLike,
    root: str | os.PathLike,
    *,
    dry_run: bool = False,
    run_fn: Callable[[Any], Any] | None = None,
) -> list[dict[str, Any]]:
    """Runs every unfinished run of a sweep file in order (resuming partial ones), keeping the
    manifest current. A failing run is recorded and the sweep goes on.

    Args:
        sweep_file: the sweep module.
        root: directory of the runs and the manifest.
        dry_run: only validate every run's config and write the manifest.
        run_fn: what runs a config (default: the COMMAND's, `t2jax.rl.trainer.train` or
            `t2jax.adaptation.run.run_adapt`).

    Returns:
        The manifest records.
    """
    sweep = load_sweep(sweep_file)
    runs = expand(sweep.entries, root)
    for run in runs:  # validate every config before spending time on the first run
        run_config(sweep, run)
    errors: dict[str, str] = {}
    write_manifest(root, sweep, runs)
    if not dry_run:
        run_fn = run_fn or COMMANDS[sweep.command].runner()
        for run in runs:
            if run_status(run) == "finished":
                continue
            logger.info("sweep run %s (%s)", run.name, run_status(run))
            try:
                run_fn(run_config(sweep, run))
            except Exception as error:  # recorded in the manifest; the sweep goes on
                logger.exception("sweep run %s failed", run.name)
                errors[run.name] = f"{type(error).__name__}: {error}"
            write_manifest(root, sweep, runs, errors)
    manifest = pathlib.Path(root) / MANIFEST_FILE
    return [json.loads(line) for line in manifest.read_text().splitlines()]

"""The files of a training run directory besides its metrics and checkpoints: the resolved config
and provenance, the exported experts, the learning curve and the summary.

Only the main process writes (`RunDirectory` methods do nothing on the others). A resumed run must
have the config it started with, except where files are and how devices are used.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax

from t2jax import files, parallel
from t2jax import metrics as metrics_lib
from t2jax.adapters import core as adapters
from t2jax.adapters import peft_format
from t2jax.config import ModelConfig
from t2jax.configuration import ConfigError, to_dict
from t2jax.rl.config import TrainConfig
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib

CONFIG_FILE = "config.json"
RUN_INFO_FILE = "run_info.json"
SUMMARY_FILE = "summary.json"
# Config fields that only say where files are and how devices are used: a run may resume on
# another machine with its data and SVD cache elsewhere, and another mesh.
LOCATION_FIELDS = ("data_dir", "cache_dir", "mesh")
# Fields that say how the gradient is computed, not what it is (the same gradient up to rounding):
# a run may resume with another SVF mode, remat, chunking or microbatching, e.g. to fit a device.
EXECUTION_FIELDS = ("mode", "remat", "logprob_chunk", "microbatch_size")


def expert_name(which: str, method: str) -> str:
    """Where a run keeps its "best", "latest" (rewritten at every checkpoint: usable while a run
    is going or after it was stopped) or "final" parameters: a portable expert file for SVF
    ("best_expert.safetensors"), a PEFT adapter directory for LoRA / IA3 / DoRA ("best_adapter")."""
    return f"{which}_expert.safetensors" if method == "svf" else f"{which}_adapter"


class RunDirectory:
    """The run directory `workdir` (created by the main process).

    Args:
        workdir: the run directory.
        is_main: whether this process writes.
    """

    def __init__(self, workdir: str | os.PathLike, *, is_main: bool):
        self.path = pathlib.Path(workdir)
        self.is_main = is_main
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: TrainConfig, mesh: jax.sharding.Mesh) -> None:
        """Writes config.json and run_info.json, after checking that a resumed run has the same
        config.

        Raises:
            ConfigError: the directory holds a run with another model, task, adapter, svf or rl
                config.
        """
        if not self.is_main:
            return
        resolved = to_dict(config)
        path = self.path / CONFIG_FILE
        if path.exists():
            previous = json.loads(path.read_text())
            # Sections and fields an older run's config lacks had their defaults then.
            defaults = to_dict(TrainConfig())
            for section in ("model", "task", "adapter", "svf", "rl"):
                before = {**defaults[section], **previous.get(section, {})}
                if _what_is_computed(before) != _what_is_computed(resolved[section]):
                    raise ConfigError(
                        f"{self.path} holds a run with a different {section} config; resume it "
                        f"with the same config or use another run.workdir"
                    )
        files.write_json_atomically(path, resolved)
        files.write_json_atomically(self.path / RUN_INFO_FILE, metrics_lib.run_info(mesh))

    def export(
        self,
        params: svf_lib.SVFParams,
        filename: str,
        parametrization: svf_lib.Parametrization,
        fingerprint: str,
    ) -> None:
        """Writes SVF params as a portable expert file (atomic replace)."""
        if not self.is_main:
            return
        expert = experts_lib.expert_from_params(
            jax.tree.map(parallel.host_array, params), parametrization, fingerprint=fingerprint
        )
        experts_lib.save_expert(expert, self.path / filename)

    def export_adapter(
        self,
        adapter: adapters.ModelAdapters,
        name: str,
        config: ModelConfig,
        *,
        alpha: float,
        base_model: str,
    ) -> None:
        """Writes a LoRA / IA3 / DoRA adapter as a PEFT adapter directory (atomic replace)."""
        if not self.is_main:
            return
        host = jax.tree.map(parallel.host_array, adapter)
        peft_format.save_peft(
            self.path / name, host, config, alpha=alpha, base_model=base_model, overwrite=True
        )

    def finish(self, summary: dict[str, Any], best_step: int | None, title: str) -> None:
        """Plots the learning curve from metrics.jsonl, then writes summary.json (last: the run is
        finished)."""
        if not self.is_main:
            return
        records = metrics_lib.read_metrics(self.path / metrics_lib.METRICS_FILE)
        metrics_lib.plot_learning_curve(
            records, self.path / metrics_lib.CURVE_FILE, best_step=best_step, title=title
        )
        files.write_json_atomically(self.path / SUMMARY_FILE, summary)


def _what_is_computed(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """A config section without its `LOCATION_FIELDS` and `EXECUTION_FIELDS`."""
    if section is None:
        return None
    ignored = LOCATION_FIELDS + EXECUTION_FIELDS
    return {key: value for key, value in section.items() if key not in ignored}

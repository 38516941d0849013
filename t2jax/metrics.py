"""What a training run records about itself (issue 5, "Observability"): JSONL metrics,
TensorBoard event files, a learning-curve PNG, per-phase step times, and the run's provenance
(resolved config, git revision, JAX version, devices).

Metric records are flat dicts with an integer "step" (the number of updates done; step 0 holds the
base model's evaluation). Only the main process writes (`t2jax.parallel.is_main_process`). On
resume, records after the restored step are dropped from the JSONL file and TensorBoard is told to
purge them, so a resumed run's metrics read exactly like an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from t2jax import files

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file (a torn last line from a crash is ignored)."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keeps only the records with step <= last_step (and drops a torn last line)."""
    path = pathlib.Path(path)
    if not path.exists():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= last_step]
    files.write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))


class MetricsLogger:
    """Appends metric records to `workdir/metrics.jsonl` and TensorBoard scalars to
    `workdir/tensorboard`; does nothing when disabled (non-main processes).

    Args:
        workdir: the run directory.
        enabled: whether this process writes.
        tensorboard: also write TensorBoard event files.
        resume_step: the step a resumed run restarts after: later records are dropped.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(
                str(pathlib.Path(workdir) / TENSORBOARD_DIR), purge_step=purge
            )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` (numbers; other values go to the JSONL file only) at `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), **{key: _plain(value) for key, value in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _plain(value: Any) -> Any:
    """Numpy/JAX scalars as Python numbers (JSON-ready)."""
    if isinstance(value, np.generic | jax.Array) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


class StepTimer:
    """Wall time per named phase of a step: `with timer.phase("rollout"): ...`.

    Phases must end with their device work done (block on results) to be meaningful.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        """{prefix + phase: seconds} plus the total under `prefix + "step"`."""
        timings = {prefix + name: seconds for name, seconds in self.seconds.items()}
        timings[prefix + "step"] = sum(self.seconds.values())
        return timings


def git_revision(directory: str | os.PathLike | None = None) -> str | None:
    """The checked-out commit (with "-dirty" if the tree has changes), or None outside git."""
    directory = directory or pathlib.Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return revision + ("-dirty" if status.strip() else "")


def run_info(mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Provenance of a run: git revision, library versions, devices, processes and mesh."""
    devices = jax.devices()
    return {
        "git_revision": git_revision(),
        "jax_version": jax.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "mesh": None if mesh is None else dict(mesh.shape),
        "hostname": platform.node(),
    }


def plot_learning_curve(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    best_step: int | None = None,
    title: str = "",
) -> None:
    """Saves a PNG with accuracy (top) and reward (bottom) per step: rollouts, and train/valid
    evaluations; the best-valid checkpoint is marked with a star and a vertical line.

    Args:
        records: metric records (see `MetricsLogger`).
        path: the PNG file.
        best_step: the step of the best-valid expert, if any.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, (accuracy_axes, reward_axes) = pyplot.subplots(2, 1, figsize=(8, 7), sharex=True)
    series = {
        "rollout/accuracy": (accuracy_axes, "rollouts (train batch)", dict(alpha=0.5)),
        "eval/train/accuracy": (accuracy_axes, "train eval", dict(marker="o")),
        "eval/valid/accuracy": (accuracy_axes, "valid eval", dict(marker="s")),
        "rollout/reward": (reward_axes, "rollouts (train batch)", dict(alpha=0.5)),
        "eval/train/reward": (reward_axes, "train eval", dict(marker="o")),
        "eval/valid/reward": (reward_axes, "valid eval", dict(marker="s")),
    }
    for key, (axes, label, style) in series.items():
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, label=label, **style)
    if best_step is not None:
        best = [r for r in records if r["step"] == best_step and "eval/valid/accuracy" in r]
        for axes in (accuracy_axes, reward_axes):
            axes.axvline(best_step, color="gray", linestyle="--", linewidth=1)
        if best:
            accuracy_axes.plot(
                best_step,
                best[0]["eval/valid/accuracy"],
                "*",
                markersize=16,
                color="gold",
                markeredgecolor="black",
                label=f"best valid (step {best_step})",
            )
    accuracy_axes.set_ylabel("accuracy")
    reward_axes.set_ylabel("mean reward")
    reward_axes.set_xlabel("update step (0 = base model)")
    for axes in (accuracy_axes, reward_axes):
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize=8)
    accuracy_axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)

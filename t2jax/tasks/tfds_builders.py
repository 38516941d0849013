"""tensorflow-datasets builders for every task, prepared offline from the local benchmark files
into array_record and read back as random-access data sources, without TensorFlow (issue 4).

    from t2jax.tasks.tfds_builders import builder_for
    builder = builder_for("gsm8k", data_dir="~/tensorflow_datasets", source_dir="../shared/data")
    builder.download_and_prepare()
    test = builder.as_data_source("test")        # len(test), test[0] -> dict of bytes/str
    # or, once prepared: tfds.data_source("t2jax_gsm8k", data_dir=..., download=False)

Each record holds `id`, `question`, `answer` (empty when a task has none) and `raw`, the source
record as JSON (MBPP+ inputs in their JSON form). Splits and their order are the task's own
(`Task.splits` minus "all", which TFDS reserves); shuffling is disabled so index i of a split is
its i-th example.
"""

from __future__ import annotations

import json
import os
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from etils import epath

from t2jax.tasks import TASK_NAMES, Example, get_task

FILE_FORMAT = "array_record"


def _json_fallback(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, complex):
        return [value.real, value.imag]
    return repr(value)


def example_to_record(example: Example) -> dict[str, str]:
    """The TFDS feature dict of an example."""
    return {
        "id": example.id,
        "question": example.question,
        "answer": example.answer or "",
        "raw": json.dumps(dict(example.raw), ensure_ascii=False, default=_json_fallback),
    }


def record_to_example(record: dict[str, Any]) -> Example:
    """Rebuilds an `Example` from a record read back from a data source (bytes or str fields)."""

    def text(value: Any) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    return Example(
        id=text(record["id"]),
        question=text(record["question"]),
        answer=text(record["answer"]) or None,
        raw=json.loads(text(record["raw"])),
    )


class TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: one TFDS dataset per task, generated from `Task.load` for every split.

    Args:
        source_dir: the benchmark data directory (default: `T2JAX_DATA`).
        **kwargs: tfds builder arguments (`data_dir`, ...); `file_format` defaults to array_record.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Official Transformer² splits."}
    task_name: ClassVar[str]

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs: Any):
        self.source_dir = source_dir
        self.task = get_task(self.task_name)
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. (tfds's own lookup needs the `importlib_resources` backport for builders
        that live in a package; this avoids the extra dependency.)"""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Transformer² benchmark '{self.task_name}' with its official splits.",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "question": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "raw": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is read from local files
        return {split: self._generate_examples(split) for split in tfds_splits(self.task)}

    def _generate_examples(self, split: str):
        for index, example in enumerate(self.task.load(split, self.source_dir)):
            yield index, example_to_record(example)


def tfds_splits(task) -> tuple[str, ...]:
    """The task's splits except "all", a name TFDS reserves."""
    return tuple(split for split in task.splits if split != "all")


def _builder_class(task_name: str) -> type[TaskBuilder]:
    class_name = "T2jax" + "".join(part.capitalize() for part in task_name.split("_"))
    return type(class_name, (TaskBuilder,), {"task_name": task_name, "__module__": __name__})


# Registered with tfds under "t2jax_<task>" (e.g. "t2jax_arc_easy") when this module is imported.
BUILDERS: dict[str, type[TaskBuilder]] = {name: _builder_class(name) for name in TASK_NAMES}


def builder_for(task_name: str, **kwargs: Any) -> TaskBuilder:
    """Returns the TFDS builder of a task (kwargs: `data_dir`, `source_dir`, ...).

    Raises:
        KeyError: unknown task name.
    """
    if task_name not in BUILDERS:
        raise KeyError(f"No TFDS builder for {task_name!r}; choose one of {', '.join(TASK_NAMES)}")
    return BUILDERS[task_name](**kwargs)

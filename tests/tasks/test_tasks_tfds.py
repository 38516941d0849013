"""TFDS builders prepare array_record files offline and read them back without TensorFlow."""

import importlib.util

import pytest
import tensorflow_datasets as tfds

from t2jax.tasks import get_task
from t2jax.tasks.tfds_builders import BUILDERS, builder_for, record_to_example, tfds_splits


def test_prepare_and_read_back_without_tensorflow(tmp_path):
    assert importlib.util.find_spec("tensorflow") is None
    builder = builder_for("arc_challenge", data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert list(tmp_path.glob("t2jax_arc_challenge/1.0.0/*.array_record-*"))
    task = get_task("arc_challenge")
    assert tfds_splits(task) == ("train", "valid", "dev", "test")
    for split in tfds_splits(task):
        expected = task.load(split)
        source = builder.as_data_source(split)
        assert len(source) == len(expected)
        for index in (0, len(expected) // 2, len(expected) - 1):
            example = record_to_example(source[index])
            assert example == expected[index]  # same id, question and answer, same order
            assert example.raw["answerKey"] == expected[index].raw["answerKey"]
    registered = tfds.data_source("t2jax_arc_challenge", data_dir=str(tmp_path), download=False)
    assert len(registered["test"]) == 1172


def test_every_task_has_a_builder():
    assert set(BUILDERS) == {
        "gsm8k",
        "mbpp",
        "humaneval",
        "arc_easy",
        "arc_challenge",
        "math",
        "cls",
    }
    with pytest.raises(KeyError, match="No TFDS builder"):
        builder_for("mmlu")

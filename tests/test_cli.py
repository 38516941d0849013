"""The `t2jax` command line end to end on a tiny random checkpoint."""

import json

import pytest
import tiny

from t2jax.cli import app as cli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_qwen2")
    tiny.save_tiny_checkpoint(directory, "qwen2_untied", seed=5)
    return directory


def test_generate_prints_one_json_record_per_prompt(tiny_dir, capsys):
    status = cli.main(
        [
            "generate",
            "--model",
            str(tiny_dir),
            "--prompt",
            "hi",
            "--prompt",
            "there",
            "--chat",
            "--max-new-tokens",
            "5",
            "--json",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()

    assert status == 0
    records = [json.loads(line) for line in lines]
    assert [record["prompt"] for record in records] == ["hi", "there"]
    assert all(record["tokens"] <= 5 for record in records)


@pytest.mark.parametrize("task", ["gsm8k", "arc_challenge", "mbpp"])
def test_eval_writes_records_summary_and_table(tiny_dir, tmp_path, task):
    out = tmp_path / "eval"
    status = cli.main(
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--task",
            task,
            "--split",
            "test",
            "--limit",
            "3",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
        ]
    )

    assert status == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(record["correct"] in (True, False) for record in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and summary["task"] == task
    assert summary["accuracy"] == sum(record["correct"] for record in records) / 3
    assert "| " + task + " | 3 |" in (out / "summary.md").read_text()


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    status = cli.main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert status == 2
    assert "no such file or directory" in capsys.readouterr().err

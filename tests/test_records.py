"""Records meant to be committed name no benchmark item: `evaluation.anonymous_id` and the
ablation's per-item evidence (`experiments/ablation.py`)."""

import argparse
import json
import pathlib
import runpy

import pytest
import tiny

from t2jax import evaluation
from t2jax.rl.run_dir import SUMMARY_FILE

ABLATION = pathlib.Path(__file__).parents[1] / "experiments" / "ablation.py"


def test_anonymous_id_hides_the_item_and_is_stable():
    hashed = evaluation.anonymous_id("HumanEval/134")
    assert hashed.startswith(evaluation.ANONYMOUS_PREFIX) and "HumanEval" not in hashed
    assert evaluation.anonymous_id("HumanEval/134") == hashed  # pairs across runs
    assert evaluation.anonymous_id(hashed) == hashed  # compacting twice changes nothing
    assert evaluation.anonymous_id("HumanEval/135") != hashed


def test_ablation_item_results_are_keyed_by_anonymous_ids(tmp_path):
    item_results = runpy.run_path(str(ABLATION))["item_results"]
    for arm in ("base", "lora"):
        for column in ("test", "unseen"):
            records = [
                {"id": "Mercury_7", "correct": arm == "lora"},
                {"id": "ACTAAP_2007_7_18", "correct": True},
            ]
            (tmp_path / arm / column).mkdir(parents=True)
            evaluation.append_records(tmp_path / arm / column / evaluation.SAMPLES_FILE, records)
    results = item_results(tmp_path, ["base", "lora"])
    mercury, actaap = (evaluation.anonymous_id(i) for i in ("Mercury_7", "ACTAAP_2007_7_18"))
    assert results["base"]["test"] == {mercury: 0, actaap: 1}
    assert results["lora"]["unseen"] == {mercury: 1, actaap: 1}
    assert list(results["base"]["test"]) == sorted(results["base"]["test"])


def test_paired_statistics_match_the_closed_form():
    statistics = evaluation.paired_statistics([1, 0, 1, 0], [1, 1, 1, 0])
    # differences 0, 1, 0, 0: mean 1/4, sample std 1/2, standard error 1/2 / sqrt(4)
    assert statistics == {
        "n": 4,
        "base_accuracy": 0.5,
        "accuracy": 0.75,
        "difference": 0.25,
        "difference_standard_error": 0.25,
    }


def stored_ablation(directory, recipe, base, arm):
    """A --records directory holding base and one arm's per-item correctness."""
    directory.mkdir()
    row = {"method": "svf", "objective": "rl", "modules": "mlp", "parameters": 7}
    rows = [
        {"arm": "base", "method": "base", "objective": "", "modules": "", "parameters": 0},
        {"arm": "svf-pg-mlp", **row, "train_minutes": 2.0},
    ]
    items = {
        name: {"test": correct, "unseen": correct}
        for name, correct in (("base", base), ("svf-pg-mlp", arm))
    }
    for name, value in (("table.json", rows), ("items.json", items), ("recipe.json", recipe)):
        (directory / name).write_text(json.dumps(value))


def test_ablation_table_is_rebuilt_from_committed_records_alone(tmp_path, capsys):
    ablation = runpy.run_path(str(ABLATION))
    argv = [
        "--task",
        "arc_easy",
        "--test-n",
        "4",
        "--unseen-n",
        "4",
        "--out",
        str(tmp_path / "runs"),
    ]
    recipe = ablation["shared_recipe"](
        argparse.Namespace(
            model="qwen2.5-coder-0.5b-instruct",
            task="arc_easy",
            updates=10,
            max_new_tokens=None,
            test_n=4,
            unseen_n=4,
        )
    )
    ids = [evaluation.anonymous_id(f"q{i}") for i in range(4)]
    stored_ablation(
        tmp_path / "records",
        recipe,
        dict(zip(ids, [1, 0, 1, 0], strict=True)),
        dict(zip(ids, [1, 1, 1, 0], strict=True)),
    )
    # nothing runs: both arms are finished in --records, and the table comes from it alone
    ablation["main"]([*argv, "--arms", "svf-pg-mlp", "--records", str(tmp_path / "records")])
    rows = json.loads((tmp_path / "records" / "table.json").read_text())
    assert [row["arm"] for row in rows] == ["base", "svf-pg-mlp"]
    assert rows[1]["test"]["vs_base"]["difference"] == 0.25
    assert rows[1]["unseen"]["vs_base"]["difference_standard_error"] == 0.25
    assert (
        "| svf-pg-mlp | svf | rl | MLP | 7 | 75.0 ± 21.7 | +25.0 ± 25.0 |"
        in capsys.readouterr().out
    )

    with pytest.raises(SystemExit, match="test_n 4 there, 5 here"):
        ablation["main"](
            [*argv, "--test-n", "5", "--report", "--records", str(tmp_path / "records")]
        )


def test_ablation_table_joins_an_arm_finished_here_to_a_committed_base(tmp_path):
    """The GSM8K table's case: base read from --records, an arm trained and evaluated here."""
    ablation = runpy.run_path(str(ABLATION))
    tiny.save_tiny_checkpoint(tmp_path / "model", "qwen2_tied")
    arguments = dict(model=str(tmp_path / "model"), task="arc_easy", test_n=2, unseen_n=2)
    recipe = ablation["shared_recipe"](
        argparse.Namespace(**arguments, updates=10, max_new_tokens=None)
    )
    ids = [evaluation.anonymous_id(f"q{i}") for i in range(2)]
    stored_ablation(tmp_path / "records", recipe, dict.fromkeys(ids, 0), dict.fromkeys(ids, 0))
    table = json.loads((tmp_path / "records" / "table.json").read_text())[:1]  # base only
    (tmp_path / "records" / "table.json").write_text(json.dumps(table))
    items = json.loads((tmp_path / "records" / "items.json").read_text())
    (tmp_path / "records" / "items.json").write_text(json.dumps({"base": items["base"]}))
    arm = tmp_path / "runs" / "arc_easy" / "svf-pg-mlp"
    arm.mkdir(parents=True)
    (arm / SUMMARY_FILE).write_text(json.dumps({"train_seconds": 60.0, "steps": 10}))
    for column in ("test", "unseen"):
        (arm / column).mkdir()
        (arm / column / "summary.json").write_text("{}")
        records = [{"id": f"q{i}", "correct": True} for i in range(2)]
        evaluation.append_records(arm / column / evaluation.SAMPLES_FILE, records)

    argv = ["--model", arguments["model"], "--test-n", "2", "--unseen-n", "2", "--report"]
    ablation["main"](
        [*argv, "--out", str(tmp_path / "runs"), "--records", str(tmp_path / "records")]
    )
    rows = json.loads((tmp_path / "records" / "table.json").read_text())
    assert [row["arm"] for row in rows] == ["base", "svf-pg-mlp"]
    assert rows[1]["parameters"] > 0 and rows[1]["train_minutes"] == 1.0
    assert rows[1]["test"]["vs_base"]["difference"] == 1.0

"""Records meant to be committed name no benchmark item: `evaluation.anonymous_id` and the
ablation's per-item evidence (`experiments/ablation.py`)."""

import pathlib
import runpy

from t2jax import evaluation

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
    results = item_results(tmp_path, [{"arm": "base"}, {"arm": "lora"}])
    mercury, actaap = (evaluation.anonymous_id(i) for i in ("Mercury_7", "ACTAAP_2007_7_18"))
    assert results["base"]["test"] == {mercury: 0, actaap: 1}
    assert results["lora"]["unseen"] == {mercury: 1, actaap: 1}
    assert list(results["base"]["test"]) == sorted(results["base"]["test"])

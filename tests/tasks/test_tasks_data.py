"""Split sizes, first and last ids of every dataset, and data-directory errors (issue 4)."""

import random

import pytest

from t2jax.tasks import TASK_NAMES, DataError, get_task
from t2jax.tasks.data import data_file, even_odd_indices, resolve_data_dir, seeded_shuffle_split

SPLITS = [
    # task, split, size, first id, last id
    ("gsm8k", "train", 3737, "gsm8k/train/0", "gsm8k/train/7472"),
    ("gsm8k", "valid", 3736, "gsm8k/train/1", "gsm8k/train/7471"),
    ("gsm8k", "test", 1319, "gsm8k/test/0", "gsm8k/test/1318"),
    ("gsm8k", "all", 8792, "gsm8k/train/0", "gsm8k/test/1318"),
    ("mbpp", "train", 200, "Mbpp/229", "Mbpp/65"),
    ("mbpp", "valid", 100, "Mbpp/451", "Mbpp/405"),
    ("mbpp", "test", 99, "Mbpp/616", "Mbpp/809"),
    ("mbpp", "all", 399, "Mbpp/2", "Mbpp/809"),
    ("humaneval", "test", 164, "HumanEval/0", "HumanEval/163"),
    ("humaneval", "all", 164, "HumanEval/0", "HumanEval/163"),
    ("arc_easy", "train", 1126, "Mercury_7220990", "Mercury_7188563"),
    ("arc_easy", "valid", 1125, "MCAS_2007_8_5189", "NCEOGA_2013_8_37"),
    ("arc_easy", "dev", 570, "MCAS_2000_4_6", "Mercury_7193078"),
    ("arc_easy", "test", 2376, "Mercury_417466", "VASoL_2009_5_34"),
    ("arc_easy", "all", 5197, "Mercury_7220990", "VASoL_2009_5_34"),
    ("arc_challenge", "train", 560, "Mercury_SC_415702", "Mercury_SC_412487"),
    ("arc_challenge", "valid", 559, "MCAS_2009_5_6516", "Mercury_7219643"),
    ("arc_challenge", "dev", 299, "Mercury_SC_407695", "Mercury_7082145"),
    ("arc_challenge", "test", 1172, "Mercury_7175875", "MEA_2013_8_15"),
    ("arc_challenge", "all", 2590, "Mercury_SC_415702", "MEA_2013_8_15"),
    ("math", "test", 5000, "math/test/0", "math/test/4999"),
    ("math", "math500", 500, "math/test/4914", "math/test/1963"),
    ("math", "all", 5000, "math/test/0", "math/test/4999"),
    ("cls", "train", 360, "cls/math/gsm8k/train/0", "cls/reasoning/OHAT_2010_5_20"),
    ("cls", "valid", 360, "cls/math/gsm8k/train/1", "cls/reasoning/AKDE&ED_2012_4_33"),
    ("cls", "test", 180, "cls/math/gsm8k/train/4", "cls/reasoning/Mercury_7008995"),
    ("cls", "all", 900, "cls/math/gsm8k/train/0", "cls/reasoning/Mercury_7008995"),
]

OFFICIAL_CLS_SPLITS = [
    ("train", 479, "cls/math/gsm8k/test/0", "cls/reasoning/Mercury_SC_LBS11003"),
    ("valid", 479, "cls/math/gsm8k/test/1", "cls/reasoning/MCAS_2005_8_2"),
    ("test", 239, "cls/math/gsm8k/test/4", "cls/reasoning/Mercury_7081603"),
    ("all", 1197, "cls/math/gsm8k/test/0", "cls/reasoning/MCAS_2005_8_2"),
]


@pytest.mark.parametrize(("name", "split", "size", "first", "last"), SPLITS)
def test_split_size_and_ends(name, split, size, first, last):
    examples = get_task(name).load(split)
    assert (len(examples), examples[0].id, examples[-1].id) == (size, first, last)
    assert len({example.id for example in examples}) == size


@pytest.mark.parametrize(("split", "size", "first", "last"), OFFICIAL_CLS_SPLITS)
def test_official_cls_recipe(split, size, first, last):
    examples = get_task("cls", recipe="official").load(split)
    assert (len(examples), examples[0].id, examples[-1].id) == (size, first, last)


def test_every_task_covers_its_splits():
    for name in TASK_NAMES:
        task = get_task(name)
        assert "all" in task.splits
        everything = {example.id for example in task.load("all")}
        for split in task.splits:
            assert {example.id for example in task.load(split)} <= everything, (name, split)


def test_train_valid_test_are_disjoint():
    for name in ("gsm8k", "mbpp", "arc_easy", "arc_challenge", "cls"):
        task = get_task(name)
        parts = [{e.id for e in task.load(split)} for split in ("train", "valid", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), name


def test_clean_cls_recipe_never_uses_evaluation_splits():
    sources = {e.raw["source_id"] for e in get_task("cls").load("all")}
    evaluation = {
        e.id for name in ("gsm8k", "arc_challenge", "mbpp") for e in get_task(name).load("test")
    }
    assert not sources & evaluation
    official = {e.raw["source_id"] for e in get_task("cls", recipe="official").load("all")}
    assert official & evaluation


def test_mbpp_split_is_the_seed_16_shuffle_of_the_first_300():
    order = list(range(300))
    random.seed(16)
    random.shuffle(order)
    assert seeded_shuffle_split(300, 200, seed=16) == (order[:200], order[200:])
    problems = get_task("mbpp").load("all")
    assert [e.id for e in get_task("mbpp").load("valid")] == [problems[i].id for i in order[200:]]


def test_even_odd_indices():
    assert even_odd_indices(5) == ([0, 2, 4], [1, 3])


def test_gold_answers_and_raw_records():
    gsm8k = get_task("gsm8k").load("train")[0]
    assert gsm8k.answer == "72" and gsm8k.raw["answer"].endswith("#### 72")
    math_example = get_task("math").load("math500")[0]
    assert math_example.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math_example.answer == math_example.raw["answer"]


def test_numeric_arc_labels_map_to_letters_by_position():
    numeric = [e for e in get_task("arc_challenge").load("test") if e.raw["answerKey"].isdigit()]
    assert len(numeric) == 22
    for example in numeric:
        labels = [choice["label"] for choice in example.raw["question"]["choices"]]
        assert example.answer == "ABCDE"[labels.index(example.raw["answerKey"])]
    official = get_task("arc_challenge", map_numeric_labels=False).load("test")
    assert sum(e.answer.isdigit() for e in official) == 22


def test_missing_data_dir_names_the_variable_and_layout(monkeypatch, tmp_path):
    monkeypatch.delenv("T2JAX_DATA")
    with pytest.raises(DataError, match="T2JAX_DATA") as error:
        get_task("gsm8k").load("test")
    assert "gsm8k/train.jsonl" in str(error.value)
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"Missing benchmark file arc/ARC-Easy-Dev\.jsonl"):
        get_task("arc_easy").load("dev", data_dir=tmp_path)


def test_alternative_file_names_and_bad_split(tmp_path):
    (tmp_path / "mbppplus").mkdir()
    (tmp_path / "mbppplus" / "MbppPlus.jsonl").write_text("{}\n")
    path = data_file(("mbppplus/MbppPlus-v0.1.0.jsonl.gz", "mbppplus/MbppPlus.jsonl"), tmp_path)
    assert path.name == "MbppPlus.jsonl"
    with pytest.raises(ValueError, match="splits"):
        get_task("humaneval").load("train")
    with pytest.raises(KeyError, match="Unknown task"):
        get_task("mmlu")

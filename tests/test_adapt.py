"""Self-adaptation on a tiny random model with three tiny experts (and a tiny cls expert):
dispatch parsing and routing, per-row generation, the batched CEM population evaluation against
one candidate at a time, the log-likelihood tie-break scorer, the few-shot split, reports, and the
two-pass pipeline end to end through `t2jax adapt`."""

import json
import pathlib
import runpy
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from t2jax import model as model_lib
from t2jax import reports
from t2jax.adaptation import dispatch as dispatch_lib
from t2jax.adaptation import few_shot, pipeline
from t2jax.adaptation.config import AdaptError, FewShotConfig
from t2jax.adaptation.expert_model import build_expert_model
from t2jax.cli import app as cli
from t2jax.loading import load_model
from t2jax.svf import cache as svf_cache
from t2jax.svf import core as svf_lib
from t2jax.svf import experts as experts_lib
from t2jax.svf import factors as svf_factors
from t2jax.svf import targets as svf_targets
from t2jax.tasks import Example, Score, Task, get_task, parse_category
from t2jax.tasks.base import TEMPLATE_PLAIN
from t2jax.tasks.data import read_jsonl
from t2jax.tasks.prompts import render_chat

pytest.importorskip("torch")

EXPERT_NAMES = ("math", "code", "reasoning")
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(directory with model/ and expert files, ExpertModel)."""
    root = tmp_path_factory.mktemp("adapt")
    tiny.save_tiny_checkpoint(root / "model", "llama", seed=3)
    loaded = load_model(str(root / "model"), dtype=jnp.float32, progress=False)
    fingerprint = svf_cache.fingerprint(loaded.config, loaded.checkpoint.tensors)
    shapes = svf_targets.svf_param_shapes(loaded.config, svf_targets.TARGET_SETS["mlp"])

    def random_expert(seed):
        params = svf_lib.init_params(jax.random.key(seed), shapes, std=2.0)
        return experts_lib.expert_from_params(params, fingerprint=fingerprint)

    experts = {name: random_expert(seed) for seed, name in enumerate(EXPERT_NAMES)}
    classifier = random_expert(7)
    for name, expert in [*experts.items(), ("cls", classifier)]:
        experts_lib.save_expert(expert, root / f"{name}.safetensors")
    model = build_expert_model(
        loaded, experts, classifier, cache_root=str(root / "svd"), progress=False
    )
    return root, model


class ChecksumTask(Task):
    """A deterministic scorer for random-model text: shot 0 is always right, the others iff the
    completion's byte sum is even."""

    name = "checksum"
    splits = ("test",)
    system_message = "Answer briefly."
    template = TEMPLATE_PLAIN

    def _load(self, split, data_dir):
        return [Example(f"checksum/{i}", f"Question {i}: {i} + {i}?", str(2 * i)) for i in range(5)]

    def score(self, example, completion):
        correct = example.id.endswith("/0") or sum(completion.encode()) % 2 == 0
        return Score(correct, completion, "checksum")


def shot_prompts(model, shots):
    tokenizer = model.adapted.tokenizer
    return [render_chat(tokenizer, shot.question, ChecksumTask.system_message) for shot in shots]


# ----------------------------------------------------------------------------------------------
# Dispatch: parsing and routing.


@pytest.mark.parametrize(
    ("output", "category"),
    [
        ("Classification: \\boxed{math}", "math"),
        ("\\boxed{code}", "code"),
        ("It needs logic.\nClassification: \\boxed{reasoning}.", "reasoning"),
        ("\\boxed{reasoning} or maybe \\boxed{math}", "reasoning"),  # the first box counts
        ("\\boxed{other}", "other"),
        ("\\boxed{Math}", "other"),  # exact match, as in the official code
        ("\\boxed{ code }", "other"),
        ("Classification: math", "other"),  # unboxed
        ("\\boxed{}", "other"),
        ("\\boxed{math", "other"),  # never closed
        ("ÿ\x00 garbage \\box{code}", "other"),
        ("", "other"),
    ],
)
def test_dispatch_parses_the_first_boxed_category(output, category):
    assert parse_category(output) == category


def test_other_and_categories_without_an_expert_route_to_the_base_weights():
    categories = ["other", "math", "code", "reasoning", "other"]
    assert dispatch_lib.route(categories, ("math", "code")) == [None, "math", "code", None, None]


def test_official_other_uses_the_last_loaded_expert():
    categories = ["other", "math", "code", "other"]
    routes = dispatch_lib.route(categories, EXPERT_NAMES, official_other=True)
    assert routes == ["math", "math", "code", "math"]  # order code, math, reasoning: math is last
    assert dispatch_lib.route(["other"], EXPERT_NAMES, official_other=True, first_pass="cls") == [
        "cls"
    ]


def test_classification_prompt_has_the_official_system_message_and_the_question(setup):
    _, model = setup
    prompt = dispatch_lib.classification_prompt(model.adapted.tokenizer, "What is 2 + 2?")
    assert "<|im_start|>system\n\n    # Analyze the given question" in prompt
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


def test_classify_parses_every_first_pass_answer(setup):
    _, model = setup
    questions = ["Sort a list in Python.", "What is 17 * 3?", "Why is the sky blue?"]
    for use_classifier in (False, True):
        dispatch = dispatch_lib.classify(
            model, questions, use_classifier=use_classifier, max_new_tokens=NEW_TOKENS
        )
        assert dispatch.categories == tuple(parse_category(t) for t in dispatch.outputs)
    assert (
        dispatch.outputs
        != dispatch_lib.classify(model, questions, max_new_tokens=NEW_TOKENS).outputs
    )


# ----------------------------------------------------------------------------------------------
# Generation with one expert per row.


def test_rows_routed_to_different_experts_equal_separate_runs(setup):
    _, model = setup
    prompts = [[5, 9, 13, 2], [7, 7, 1], [30, 31, 32, 33, 34], [40, 41]]
    choices = [model.expert_z["math"], None, model.expert_z["code"]]
    row_choice = [0, 1, 2, 1]

    together = model.adapted.generate(
        prompts, choices, row_choice, max_new_tokens=NEW_TOKENS
    ).token_ids

    alone = [
        model.adapted.generate([p], choices, [c], max_new_tokens=NEW_TOKENS).token_ids[0]
        for p, c in zip(prompts, row_choice, strict=True)
    ]
    base = model.adapted.sampler.generate(prompts, max_new_tokens=NEW_TOKENS).token_ids
    assert together == alone
    assert together[1] == base[1] and together[3] == base[3]  # "other" rows: the base weights
    assert together[0] != base[0] or together[2] != base[2]  # the experts do change outputs


def test_base_z_is_the_base_model_and_sampled_calls_take_seed_plus_start_row(setup):
    _, model = setup
    adapted = model.adapted
    prompts = [[5, 9, 13, 2], [7, 7, 1], [30, 31, 32, 33, 34]]
    base = adapted.sampler.generate(prompts, max_new_tokens=NEW_TOKENS).token_ids
    unit = adapted.generate(prompts, [adapted.base_z()], [0] * 3, max_new_tokens=NEW_TOKENS)
    assert unit.token_ids == base

    z = model.expert_z["math"]
    sampled = adapted.generate(
        prompts, [z], [0] * 3, max_new_tokens=NEW_TOKENS, rows_per_call=2, temperature=1.0, seed=7
    )
    sampler = adapted.sampler_for(z)
    parts = [
        sampler.generate(
            prompts[start : start + 2], max_new_tokens=NEW_TOKENS, temperature=1.0, seed=7 + start
        ).token_ids
        for start in (0, 2)
    ]
    assert sampled.token_ids == parts[0] + parts[1]


def test_log_likelihood_matches_a_full_forward_pass(setup):
    _, model = setup
    prompt_ids, output_ids = [[5, 9, 13], [7, 7, 1, 2, 3]], [[40, 41, 42], []]
    z = model.expert_z["code"]
    got = model.adapted.log_likelihood(prompt_ids, output_ids, [z], [0, 0], rows_per_call=4)

    weights = svf_factors.merge_into_weights(model.adapted.weights, model.adapted.factors, z)
    tokens = jnp.asarray([prompt_ids[0] + output_ids[0]])
    mask = jnp.ones_like(tokens, bool)
    positions = model_lib.positions_from_mask(mask)
    hidden, _ = model_lib.forward(model.adapted.config, weights, tokens, positions, mask)
    log_probs = jax.nn.log_softmax(model_lib.logits(weights, hidden))[0]  # [T, V]
    per_token = [log_probs[2 + i, token] for i, token in enumerate(output_ids[0])]
    np.testing.assert_allclose(got, [np.mean(per_token), 0.0], rtol=1e-4, atol=1e-5)
    summed = model.adapted.log_likelihood(
        prompt_ids, output_ids, [z], [0, 0], rows_per_call=4, reduce="sum"
    )
    np.testing.assert_allclose(summed, [np.sum(per_token), 0.0], rtol=1e-4, atol=1e-5)


def reply_log_likelihood(model, z, prompt_ids, reply_ids) -> float:
    """log p(reply | prompt) from one unpadded full forward pass under W'(z)."""
    weights = (
        model.adapted.weights
        if z is None
        else svf_factors.merge_into_weights(model.adapted.weights, model.adapted.factors, z)
    )
    tokens = jnp.asarray([list(prompt_ids) + list(reply_ids)])
    mask = jnp.ones_like(tokens, bool)
    hidden, _ = model_lib.forward(
        model.adapted.config, weights, tokens, model_lib.positions_from_mask(mask), mask
    )
    log_probs = jax.nn.log_softmax(model_lib.logits(weights, hidden))[0]  # [T, V]
    start = len(prompt_ids) - 1
    return float(sum(log_probs[start + i, token] for i, token in enumerate(reply_ids)))


@pytest.mark.parametrize("expert", [None, "code"])
def test_log_likelihood_runs_a_shared_prompt_prefix_once(setup, monkeypatch, expert):
    """Rows of one call under one weight set whose prompts share >= min_shared_prefix tokens run
    the prefix once (the likelihood dispatch's classification prompt); the scores equal
    unpadded full forward passes. The last call holds one row: no prefix to share."""
    from t2jax import adapted as adapted_lib

    _, model = setup
    prefix = list(range(3, 43))  # 40 tokens, above the default minimum of 32
    prompts = [[*prefix, 50, 51], [*prefix, 60]]
    replies = [[70, 71, 72], [73]]
    rows = [(p, r) for p in prompts for r in replies]  # 4 rows, question-major
    calls = []
    output_log_prob = adapted_lib._output_log_prob

    def counting(*args):
        if args[-1] is not None:  # the shared prefix
            calls.append(args[-1].ids.shape)
        return output_log_prob(*args)

    monkeypatch.setattr(adapted_lib, "_output_log_prob", counting)
    z = None if expert is None else model.expert_z[expert]
    got = model.adapted.log_likelihood(
        [p for p, _ in rows], [r for _, r in rows], [z], [0] * 4, rows_per_call=3, reduce="sum"
    )
    assert calls == [(1, 64)]  # the 40-token prefix, in its bucket, once for the first call
    expected = [reply_log_likelihood(model, z, p, r) for p, r in rows]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["likelihood", "calibrated"])
@pytest.mark.parametrize("use_classifier", [False, True])
def test_likelihood_dispatch_takes_the_most_likely_category_answer(setup, use_classifier, method):
    _, model = setup
    questions = ["Sort a list in Python.", "What is 17 * 3?", "Why is the sky blue?"]
    dispatch = dispatch_lib.classify(
        model, questions, use_classifier=use_classifier, method=method, rows_per_call=5
    )
    labels = ("code", "math", "reasoning", "other")
    z = model.expert_z["cls"] if use_classifier else None
    tokenizer = model.adapted.tokenizer

    def label_scores(question: str) -> np.ndarray:
        prompt = model.adapted.sampler.encode(
            [dispatch_lib.classification_prompt(tokenizer, question)]
        )[0]
        return np.array(
            [
                reply_log_likelihood(
                    model,
                    z,
                    prompt,
                    model.adapted.sampler.encode([f"Classification: \\boxed{{{label}}}"])[0],
                )
                for label in labels
            ]
        )

    prior = np.zeros(len(labels))
    if method == "calibrated":  # contextual calibration: the mean over content-free questions
        prior = np.mean([label_scores(q) for q in ("N/A", "", "[MASK]")], axis=0)
    expected = [labels[int(np.argmax(label_scores(q) - prior))] for q in questions]
    assert dispatch.categories == tuple(expected)
    assert dispatch.method == method
    assert dispatch.outputs == tuple(f"Classification: \\boxed{{{c}}}" for c in expected)
    assert {parse_category(text) for text in dispatch.outputs} <= set(labels)


# ----------------------------------------------------------------------------------------------
# Few-shot CEM.


def test_official_few_shot_splits():
    shots, rest = few_shot.few_shot_split("arc_challenge", 1172, 10)
    assert len(shots) == 10 and len(rest) == 1162 and not set(shots) & set(rest)
    assert (
        few_shot.few_shot_split("math", 5000, 10)[0]
        != few_shot.few_shot_split("humaneval", 5000, 10)[0]
    )
    with pytest.raises(AdaptError, match="no official few-shot seed"):
        few_shot.few_shot_split("gsm8k", 100, 10)


def test_split_items_without_an_official_seed_keeps_every_item():
    items = ChecksumTask().load("test")
    assert few_shot.split_items("checksum", items, FewShotConfig(shots=2)) == ([], items)
    shots, rest = few_shot.split_items("checksum", items, FewShotConfig(shots=2, split_seed=1))
    assert len(shots) == 2 and sorted(shots + rest, key=lambda e: e.id) == items


def test_initial_alpha_and_mixing_spaces(setup):
    _, model = setup
    assert few_shot.initial_alpha(model, "global").tolist() == pytest.approx([1 / 3] * 3)
    per_matrix = few_shot.initial_alpha(model, "per_matrix")
    assert per_matrix.shape == (3, model.adapted.config.num_layers * 3)  # [K, L * (gate, up, down)]
    z_basis, p_basis = few_shot.mixing_basis(model, "z"), few_shot.mixing_basis(model, "p")
    np.testing.assert_allclose(z_basis["mlp.up_proj"], jax.nn.sigmoid(p_basis["mlp.up_proj"]))
    one_hot = jnp.asarray([[0.0, 1.0, 0.0]])  # [P=1, K]: the code expert alone
    mixed = few_shot.mix_population(z_basis, one_hot, False, model.adapted.targets)
    np.testing.assert_allclose(mixed["mlp.down_proj"][0], model.expert_z["code"]["mlp.down_proj"])


def test_batched_population_fitness_equals_each_candidate_alone(setup):
    _, model = setup
    task = ChecksumTask()
    shots = task.load("test")[:3]
    prompts = shot_prompts(model, shots)
    alphas = jax.random.uniform(jax.random.key(4), (4, 3))  # [P, K]
    z_population = few_shot.mix_population(
        few_shot.mixing_basis(model, "z"), alphas, False, model.adapted.targets
    )

    batched = few_shot.score_population(
        model, task, shots, prompts, z_population, max_new_tokens=NEW_TOKENS
    )
    alone = few_shot.score_population(  # one merged W' and one sampler call per candidate
        model, task, shots, prompts, z_population, max_new_tokens=NEW_TOKENS, per_candidate=True
    )

    assert alone.texts == batched.texts
    np.testing.assert_array_equal(alone.correct, batched.correct)
    np.testing.assert_array_equal(alone.accuracy, batched.accuracy)
    np.testing.assert_allclose(alone.loglik, batched.loglik, rtol=1e-4)
    assert len({tuple(texts) for texts in batched.texts}) > 1  # candidates differ


def test_tied_candidates_get_the_log_likelihood_of_their_correct_answers(setup):
    _, model = setup
    task = ChecksumTask()
    shots = task.load("test")[:2]
    prompts = shot_prompts(model, shots)
    z = model.expert_z["reasoning"]
    z_population = {key: jnp.stack([v, v, v]) for key, v in z.items()}  # three equal candidates

    scores = few_shot.score_population(
        model, task, shots, prompts, z_population, max_new_tokens=NEW_TOKENS
    )

    assert scores.accuracy.tolist() == [scores.accuracy[0]] * 3 and scores.accuracy[0] > 0
    prompt_ids = model.adapted.sampler.encode(prompts)
    correct = np.flatnonzero(scores.correct[0])
    generation = model.adapted.generate(
        [prompt_ids[n] for n in correct], [z], [0] * len(correct), max_new_tokens=NEW_TOKENS
    )
    expected = model.adapted.log_likelihood(
        [prompt_ids[n] for n in correct], generation.token_ids, [z], [0] * len(correct)
    ).mean()
    np.testing.assert_allclose(scores.loglik, [expected] * 3, rtol=1e-4)
    off = few_shot.score_population(
        model, task, shots, prompts, z_population, max_new_tokens=NEW_TOKENS, tie_break=False
    )
    assert np.isnan(off.loglik).all()


def test_few_shot_search_keeps_an_incumbent_that_is_never_worse(setup):
    _, model = setup
    task = ChecksumTask()
    shots = task.load("test")[:3]
    config = FewShotConfig(
        shots=3, generations=2, population_size=4, elite_ratio=0.5, alpha_shape="global"
    )
    result = few_shot.few_shot_search(
        model, task, shots, shot_prompts(model, shots), config, max_new_tokens=NEW_TOKENS
    )
    assert result.experts == EXPERT_NAMES and result.alpha.shape == (3,)
    assert ((result.alpha >= 0) & (result.alpha <= 1)).all()
    best = [entry["best_fitness"] for entry in result.history]
    assert best[1] >= best[0] and best[0] >= 1 / 3  # shot 0 is always right
    np.testing.assert_allclose(
        result.z["mlp.up_proj"],
        np.einsum("k,klr->lr", result.alpha, few_shot.mixing_basis(model, "z")["mlp.up_proj"]),
        rtol=1e-5,
    )


# ----------------------------------------------------------------------------------------------
# Reports.


def test_table2_markdown_json_and_plots(tmp_path):
    results = {
        "base": {"math": {"accuracy": 0.25, "n": 40}, "arc_challenge": {"accuracy": 0.5, "n": 40}},
        "prompt": {
            "math": {"accuracy": 0.3, "n": 40},
            "arc_challenge": {
                "accuracy": 0.45,
                "n": 40,
                "vs_base": {"difference": -0.05, "difference_standard_error": 0.0312},
            },
        },
    }
    table = reports.table2(results, model="tiny")
    markdown = reports.write_table2(table, tmp_path).read_text()
    assert "| tiny | 25.00 (1.00) | 50.00 (1.00) |" in markdown
    assert "| + T² (Prompt) | 30.00 (1.20) | 45.00 (0.90), -5.0 ± 3.1 |" in markdown
    assert json.loads((tmp_path / "table2.json").read_text())["tasks"] == ["math", "arc_challenge"]

    counts = reports.confusion_counts(["math", "math", "code"], ["math", "other", "code"])
    assert counts.tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]
    run = pipeline.AdaptRun(
        "prompt",
        (Example("a", "q", None),) * 2,
        ("p",) * 2,
        ("o",) * 2,
        (None,) * 2,
        0.0,
        0.0,
        dispatch=dispatch_lib.Dispatch(categories=("code", "other"), outputs=("", "")),
    )
    assert dispatch_lib.dispatch_confusion({"humaneval": run.dispatch.categories}).tolist()[0] == [
        1,
        0,
        0,
        1,
    ]
    with pytest.raises(ValueError, match="cannot count"):
        reports.confusion_counts(["physics"], ["math"])
    reports.plot_confusions({"base": counts, "cls-expert": counts}, tmp_path / "confusion.png")
    reports.plot_alpha(
        {"math": np.ones((3, 6)) / 3, "humaneval": np.asarray([0.1, 0.8, 0.3])},
        EXPERT_NAMES,
        tmp_path / "alpha.png",
    )
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    assert (tmp_path / "alpha.png").stat().st_size > 1000
    timing = reports.timing_markdown({"math": {"first_pass_seconds": 1, "second_pass_seconds": 4}})
    assert "| MATH | 1.00 | 4.00 | 25% |" in timing


# ----------------------------------------------------------------------------------------------
# The two-pass pipeline end to end.


def adapt_command(root, out, *extra):
    experts = ",".join(f"{name}={root / name}.safetensors" for name in EXPERT_NAMES)
    argv = [
        "adapt",
        "--model",
        str(root / "model"),
        "--experts",
        experts,
        "--cache-dir",
        str(root / "svd"),
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--classify-max-new-tokens",
        str(NEW_TOKENS),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    return cli.main(argv)


@pytest.mark.parametrize(
    ("strategy", "dispatch"), [("prompt", "generate"), ("cls", "generate"), ("cls", "likelihood")]
)
def test_two_pass_dispatch_on_a_task(setup, tmp_path, strategy, dispatch):
    root, _ = setup
    extra = ["--cls-expert", str(root / "cls.safetensors")] if strategy == "cls" else []
    extra += ["--dispatch", dispatch]
    status = adapt_command(
        root, tmp_path, "--strategy", strategy, "--task", "arc_challenge", "--limit", "3", *extra
    )

    assert status == 0
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for record in records:
        assert record["category"] == parse_category(record["classification"])
        assert record["route"] == (record["category"] if record["category"] != "other" else None)
        assert record["correct"] in (True, False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["n"] == 3
    assert summary["dispatch"] == dispatch
    assert (
        set(summary["routes"]) <= {"base", *EXPERT_NAMES} and sum(summary["routes"].values()) == 3
    )
    assert summary["first_pass_seconds"] > 0 and summary["second_pass_seconds"] > 0
    assert (tmp_path / "confusion.png").exists()
    items = get_task("arc_challenge").load("test")
    _, rest = few_shot.few_shot_split("arc_challenge", len(items), 10)
    assert [r["id"] for r in records] == [items[i].id for i in rest[:3]]  # shots left out


def test_compare_base_prints_both_answers_of_every_item(setup, tmp_path, capsys):
    root, _ = setup
    argv = ["--strategy", "prompt", "--dispatch", "likelihood", "--task", "arc_easy"]
    assert adapt_command(root, tmp_path, *argv, "--limit", "3", "--compare-base") == 0

    base = [json.loads(line) for line in (tmp_path / "base/samples.jsonl").read_text().splitlines()]
    adapted = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in base] == [r["id"] for r in adapted]
    assert all(record["route"] is None for record in base)
    summary = json.loads((tmp_path / "summary.json").read_text())
    base_summary = json.loads((tmp_path / "base/summary.json").read_text())
    assert summary["base"]["accuracy"] == base_summary["accuracy"]
    assert base_summary["strategy"] == "base" and base_summary["n"] == 3
    table = (tmp_path / "comparison.md").read_text()
    assert table in capsys.readouterr().out  # the command prints it
    assert table == reports.item_comparison({"base": base, "adapted (prompt)": adapted})

    # Free prompts have nothing to compare against.
    assert adapt_command(root, tmp_path, "--prompt", "x", "--compare-base") == 2
    assert "--compare-base" in capsys.readouterr().err


def test_item_comparison_table():
    def record(item, extracted, correct, **route):
        return {"id": item, "gold": "B", "extracted": extracted, "correct": correct, **route}

    base = [record("q1", "A", False), record("q2", "B", True)]
    adapted = [record("q1", "B", True, route="reasoning"), record("q2", None, False, route=None)]
    assert reports.item_comparison({"base": base, "adapted": adapted}).splitlines() == [
        "| item | gold | base | adapted |",
        "|---|---|---|---|",
        "| q1 | B | A ✗ | B ✓ (reasoning) |",
        "| q2 | B | B ✓ | – ✗ (base) |",
        "| accuracy | | 1/2 (50.0%) | 1/2 (50.0%) |",
    ]
    program = [record("q1", "def f(x):\n    return x | 1", True)]
    assert "| def f(x): return x \\| 1 ✓ |" in reports.item_comparison({"code": program})
    long = [record("q1", "x" * 30, False)]
    assert f"| {'x' * 23}… ✗ |" in reports.item_comparison({"long": long})
    with pytest.raises(ValueError, match="same items"):
        reports.item_comparison({"base": base, "adapted": adapted[::-1]})


def test_two_pass_few_shot_on_a_task(setup, tmp_path):
    root, _ = setup
    status = adapt_command(
        root,
        tmp_path,
        "--strategy",
        "fewshot",
        "--task",
        "arc_challenge",
        "--limit",
        "2",
        "--shots",
        "2",
        "--generations",
        "2",
        "--population",
        "4",
        "--elite-ratio",
        "0.5",
        "--mix-space",
        "p",
    )

    assert status == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n"] == 2 and summary["routes"] == {"mixture": 2}
    assert summary["experts"] == list(EXPERT_NAMES)
    assert np.asarray(summary["alpha"]).shape == (3, 2 * 3)  # per matrix by default
    assert len(summary["history"]) == 2
    ids = [json.loads(line)["id"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    items = get_task("arc_challenge").load("test")
    _, rest = few_shot.few_shot_split("arc_challenge", len(items), 2)
    assert ids == [items[i].id for i in rest[:2]]  # the first reported items, shots excluded
    assert (tmp_path / "alpha.png").exists()


def test_free_prompts_and_clear_errors(setup, tmp_path, capsys):
    root, _ = setup
    status = adapt_command(root, tmp_path, "--strategy", "prompt", "--prompt", "Sort a list.")
    assert status == 0
    record = json.loads((tmp_path / "samples.jsonl").read_text())
    assert record["id"] == "prompt/0" and "correct" not in record

    status = adapt_command(
        root,
        tmp_path,
        *("--strategy", "fewshot", "--task", "arc_challenge", "--prompt", "Sort a list."),
        *("--shots", "2", "--generations", "1", "--population", "4", "--elite-ratio", "0.5"),
        *("--alpha-shape", "global"),
    )
    assert status == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["routes"] == {"mixture": 1} and len(summary["alpha"]) == 3

    assert adapt_command(root, tmp_path, "--strategy", "cls", "--prompt", "x") == 2
    assert "--cls-expert" in capsys.readouterr().err
    assert adapt_command(root, tmp_path, "--strategy", "fewshot", "--prompt", "x") == 2
    assert "needs requests.task (--task)" in capsys.readouterr().err
    for experts, message in [
        (f"physics={root / 'math.safetensors'}", "must be named code, math or reasoning"),
        ("math", "NAME=PATH"),
        ("math=a,math=b", "given twice"),
    ]:
        argv = ["adapt", "--model", "unused", "--experts", experts, "--strategy", "prompt"]
        assert cli.main([*argv, "--prompt", "x"]) == 2
        assert message in capsys.readouterr().err


def test_table2_script_writes_cells_and_reuses_them(setup, tmp_path, monkeypatch):
    root, _ = setup
    experts = ",".join(f"{name}={root / name}.safetensors" for name in EXPERT_NAMES)
    script = pathlib.Path(__file__).parents[1] / "experiments" / "adapt_table2.py"
    argv = [
        str(script),
        "--model",
        str(root / "model"),
        "--experts",
        experts,
        "--cls-expert",
        str(root / "cls.safetensors"),
        "--cache-dir",
        str(root / "svd"),
        "--tasks",
        "arc_challenge",
        "--methods",
        "base,cls,fewshot",
        "--limit",
        "2",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--classify-max-new-tokens",
        str(NEW_TOKENS),
        "--cls-dispatch",
        "likelihood",
        "--shots",
        "2",
        "--generations",
        "1",
        "--population",
        "4",
        "--elite-ratio",
        "0.5",
        "--out",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")

    table = json.loads((tmp_path / "table2.json").read_text())
    assert [row["method"] for row in table["rows"]] == ["base", "cls", "fewshot"]
    assert all(row["cells"]["arc_challenge"]["n"] == 2 for row in table["rows"])
    assert all("difference" in row["cells"]["arc_challenge"] for row in table["rows"][1:])
    assert (tmp_path / "confusion.png").exists() and (tmp_path / "alpha.png").exists()
    cls_summary = json.loads((tmp_path / "cls" / "arc_challenge" / "summary.json").read_text())
    assert cls_summary["dispatch"] == "likelihood"

    # A rerun reuses finished cells: an edited summary shows up in the rebuilt table.
    summary_path = tmp_path / "cls" / "arc_challenge" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "accuracy": 0.123}))
    runpy.run_path(str(script), run_name="__main__")
    table = json.loads((tmp_path / "table2.json").read_text())
    assert table["rows"][1]["cells"]["arc_challenge"]["accuracy"] == 0.123

    # --records keeps the finished cells in one file without prompts, outputs or item names; a
    # run in an empty directory seeded from it reuses them.
    records = tmp_path / "records.json"
    monkeypatch.setattr(sys, "argv", [*argv, "--report-only", "--records", str(records)])
    runpy.run_path(str(script), run_name="__main__")
    compact = json.loads(records.read_text())["cls"]["arc_challenge"]["records"]
    assert len(compact) == 2 and {"correct", "category", "extracted"} <= set(compact[0])
    assert not {"prompt", "output", "gold", "reason"} & set(compact[0])
    assert {record["extracted"] for record in compact} <= {"", None}
    full = read_jsonl(tmp_path / "cls" / "arc_challenge" / "samples.jsonl")
    assert all(record["id"].startswith("item-") for record in compact)
    assert not {record["id"] for record in full} & {record["id"] for record in compact}
    out = argv.index("--out") + 1
    seeded_dir = tmp_path / "seeded"
    with_records = [*argv[out + 1 :], "--report-only", "--records", str(records)]
    monkeypatch.setattr(sys, "argv", [*argv[:out], str(seeded_dir), *with_records])
    runpy.run_path(str(script), run_name="__main__")
    seeded = json.loads((seeded_dir / "table2.json").read_text())
    assert seeded["rows"][1]["method"] == "cls"

    # A cell run after seeding --out from the records (hashed ids) still pairs with their base.
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "cls", mixed / "cls")
    monkeypatch.setattr(sys, "argv", [*argv[:out], str(mixed), *with_records])
    runpy.run_path(str(script), run_name="__main__")
    seeded_base = read_jsonl(mixed / "base" / "arc_challenge" / "samples.jsonl")
    assert seeded_base[0]["id"].startswith("item-")
    cls_cell = json.loads((mixed / "table2.json").read_text())["rows"][1]["cells"]["arc_challenge"]
    assert cls_cell["difference"] == seeded["rows"][1]["cells"]["arc_challenge"]["difference"]

    # --report-only runs nothing: a method without finished cells gets no row.
    methods = argv.index("--methods") + 1
    argv[methods] = "base,prompt"
    monkeypatch.setattr(sys, "argv", [*argv, "--report-only"])
    runpy.run_path(str(script), run_name="__main__")
    assert not (tmp_path / "prompt").exists()
    table = json.loads((tmp_path / "table2.json").read_text())
    assert [row["method"] for row in table["rows"]] == ["base"]


def test_builtin_experts_are_the_shipped_ones_of_the_model(setup, tmp_path, monkeypatch, capsys):
    from t2jax.svf import shipped

    root, _ = setup
    shipped_dir = tmp_path / "shipped"
    (shipped_dir / "model").mkdir(parents=True)  # the model directory's name is its key
    for name in (*EXPERT_NAMES, "cls"):
        (shipped_dir / "model" / f"{name}.safetensors").write_bytes(
            (root / f"{name}.safetensors").read_bytes()
        )
    card = {"task": "arc_easy", "test": {"n": 300, "base_accuracy": 0.24, "accuracy": 0.39,
            "difference": 0.15, "difference_standard_error": 0.04}}  # fmt: skip
    (shipped_dir / "model" / "reasoning.json").write_text(json.dumps(card))
    monkeypatch.setattr(shipped, "SHIPPED_DIR", shipped_dir)

    assert shipped.builtin_paths(str(root / "model")) == {
        name: str(shipped_dir / "model" / f"{name}.safetensors") for name in sorted(EXPERT_NAMES)
    }
    assert list(shipped.builtin_paths("model", classifier=True)) == ["cls"]
    with pytest.raises(ValueError, match="shipped experts exist for: model"):
        shipped.builtin_paths("other-model")

    assert cli.main(["expert", "list"]) == 0
    listing = capsys.readouterr().out
    assert "reasoning" in listing and "24.0% -> 39.0% (+15.0 ± 4.0 paired SE, N=300)" in listing

    out = tmp_path / "run"
    argv = ["adapt", "--model", str(root / "model"), "--experts", "builtin", "--cls-expert"]
    argv += ["builtin", "--strategy", "cls", "--prompt", "Sort a list.", "--out", str(out)]
    argv += ["--cache-dir", str(root / "svd"), "--max-new-tokens", str(NEW_TOKENS), "--no-progress"]
    argv += ["--dispatch", "likelihood"]
    assert cli.main(argv) == 0
    record = json.loads((out / "samples.jsonl").read_text())
    assert record["category"] in ("code", "math", "reasoning", "other")


def test_every_shipped_expert_loads_and_its_card_reports_the_test_against_base():
    from t2jax.svf import experts as experts_lib
    from t2jax.svf import shipped

    found = shipped.shipped_experts()
    assert {"math", "code", "reasoning", "cls"} <= {
        e.name for e in found if e.model == "qwen2.5-coder-0.5b-instruct"
    }
    for expert in found:
        experts_lib.load_expert(expert.path)  # a readable, valid expert file
        test = expert.card["test"]
        assert expert.card["model"] == expert.model and expert.card["name"] == expert.name
        assert test["n"] >= 99 and 0 <= test["base_accuracy"] <= 1 and 0 <= test["accuracy"] <= 1
        assert expert.path.with_suffix(".md").read_text().startswith(f"# {expert.name} expert")

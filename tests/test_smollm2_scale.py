"""The per-family checks of `test_architectures.py` at real scale: SmolLM2-135M with `modules: auto`.

All 210 matrices (30 blocks × q, k, v, o, gate, up, down) decomposed at the paper's ratios (C 386 to 2,690,
288,060 subcomponents per position), a random untrained decomposition in float64 with two subcomponents of
every matrix alive at each position. Checked: all-ones masks plus Δ give the model's logits; the strongest
sampled edge of every kind (k/v → o across positions included) equals its finite-difference intervention;
q/k scores reproduce the model's attention with 9 query heads on 3 key-value heads; ablating through forward
hooks equals the masked forward; greedy generation under interventions with a KV cache equals full forwards.

Marked `slow` and run only with `VPD_REAL_MODEL=1` (it fetches and converts the model when it is not in the
data directory): about 9 GB of memory and a few minutes on a 2-core CPU, outside CI's budget.

    VPD_REAL_MODEL=1 python -m pytest tests/test_smollm2_scale.py
"""

from __future__ import annotations

import os

import pytest
import torch

from attrgraph.attention import attention_pattern, qk_unavailable
from attrgraph.edges import attribute
from attrgraph.nodes import module_short_name
from attrgraph.qk import score_terms
from circuits.interventions import Intervention, ablate, generate_ids, intervene
from tests.conftest import EDGE_KINDS, finite_difference_edge, float64_decomposition, float64_throughout

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("VPD_REAL_MODEL") != "1", reason="SmolLM2-135M at real scale; set VPD_REAL_MODEL=1"
    ),
]

PROMPT = "The princess lost her crown"
ALIVE = 2  # subcomponents alive per matrix and position


@pytest.fixture(scope="module")
def real():
    from decomposer.target import load_target

    model, tokenizer = load_target("smollm2-135m")
    model.config._attn_implementation = "eager"
    torch.manual_seed(0)
    with float64_throughout():
        d = float64_decomposition(model, "auto")
    tokens = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    T, gen = tokens.shape[1], torch.Generator().manual_seed(1)
    ci = {}
    for p in d.module_paths:
        g = torch.zeros(T, d.Cs[p], dtype=torch.float64)
        for t in range(T):
            g[t, torch.randperm(d.Cs[p], generator=gen)[:ALIVE]] = 0.5 + 0.5 * torch.rand(ALIVE, generator=gen).double()
        ci[p] = g
    return d, tokenizer, tokens, ci


def test_auto_takes_all_210_matrices_and_ones_plus_delta_give_the_logits(real):
    d, _, tokens, _ = real
    assert len(d.module_paths) == 210
    assert {module_short_name(p)[2]: d.Cs[p] for p in d.module_paths[:7]} == {
        "q": 386, "k": 386, "v": 766, "o": 766, "gate": 2304, "up": 2304, "down": 2690,
    }  # fmt: skip
    B, T = tokens.shape
    with float64_throughout(), torch.no_grad():
        clean = d.model.target(tokens).logits
        masks = {p: torch.ones(B, T, d.Cs[p], dtype=torch.float64) for p in d.module_paths}
        deltas = {p: torch.ones(B, T, dtype=torch.float64) for p in d.module_paths}
        masked = d.model(tokens, masks=masks, delta_masks=deltas).logits
    torch.testing.assert_close(masked, clean, rtol=0, atol=1e-9)


def test_sampled_edges_of_every_kind_equal_interventions(real):
    d, _, tokens, ci = real
    with float64_throughout():
        att = attribute(d, tokens, ci=ci, batch_size=8)
        nz = att.A.nonzero().tolist()
        for kind, pick in EDGE_KINDS.items():
            candidates = [(t, s) for t, s in nz if pick(att.nodes[s], att.nodes[t])]
            assert candidates, f"no nonzero {kind} edge"
            tgt, src = max(candidates, key=lambda ts: abs(float(att.A[ts[0], ts[1]])))
            expected = finite_difference_edge(d, tokens, att, tgt, src)
            stored = float(att.A[tgt, src])
            assert stored == pytest.approx(expected, rel=1e-5, abs=1e-9), f"{kind}: {att.nodes[src]} → {att.nodes[tgt]}"


@pytest.mark.parametrize("layer", [0, 14, 29])
def test_qk_scores_reproduce_the_grouped_attention(real, layer):
    d, _, tokens, _ = real
    assert qk_unavailable(d) is None
    with float64_throughout():
        terms = score_terms(d, tokens, layer)
        model = attention_pattern(d, tokens, layer)[0].double()
    assert model.shape[0] == 9  # query heads; k and v have 3
    torch.testing.assert_close(terms.attention(), model, rtol=0, atol=1e-6)
    assert model[:, 1:].max() < 0.999


def test_ablation_through_hooks_equals_the_masked_forward(real):
    d, _, tokens, _ = real
    B, T = tokens.shape
    path = "model.layers.12.mlp.up_proj"
    with float64_throughout(), torch.no_grad():
        with intervene(d, Intervention(nodes=("12.mlp.up:1", "12.mlp.up:2@3"), kind="zero")):
            hooked = d.model.target(tokens).logits
        mask = torch.ones(B, T, d.Cs[path], dtype=torch.float64)
        mask[:, :, 1] = 0
        mask[:, 3, 2] = 0
        masked = d.model(tokens, masks={path: mask}, delta_masks={path: torch.ones(B, T, dtype=torch.float64)}).logits
        clean = d.model.target(tokens).logits
    torch.testing.assert_close(hooked, masked, rtol=0, atol=1e-9)
    assert not torch.allclose(hooked, clean, atol=1e-7)


@pytest.mark.parametrize("kind", ["zero", "scale"])
def test_generation_with_interventions_equals_full_forwards(real, kind):
    d, _, tokens, _ = real
    T = tokens.shape[1]
    nodes = ["3.attn.v:5", "3.attn.v:7", "20.mlp.down:11", "20.mlp.down:12"]
    nodes += [f"1.attn.o:{c}@{T + 1}" for c in range(4)]  # at a generated position
    extra = {"scale": -3.0} if kind == "scale" else {}
    with float64_throughout():
        out = generate_ids(d, tokens, Intervention(nodes, kind, **extra), max_new_tokens=3, use_cache=True)
        seq = tokens
        for _ in range(3):
            now = [n for n in nodes if "@" not in n or int(n.split("@")[1]) < seq.shape[1]]
            res = ablate(d, seq, now, kind, **extra)
            seq = torch.cat([seq, res.logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert res.kl[:, T - 1 :].min() > 1e-9

"""The examples artifact cut from a harvest: every field against the harvest's own queries or a hand count.

CI is under the test's control (as in test_circuits_harvest.py): `d.causal_importance` returns fixed tensors,
so every firing, context and word is known in advance.
"""

from __future__ import annotations

import json

import pytest
import torch

from attrgraph.examples import (
    EXAMPLES_DIR,
    cards_for,
    examples_path,
    load_examples,
)
from attrgraph.labels import card_label
from circuits.harvest import examples_from_harvest, harvest
from decomposer.errors import ArtifactFormatError, DamagedArtifactError, VpdError
from tests.conftest import float64_decomposition, tiny_llama

# Byte-level-BPE-like strings: a leading space opens a word, "cess" and "ness" continue one.
STRINGS = [" the", " prin", "cess", " lost", " her", ".", " dark", "ness", " crown", " and", " a", "\n"]
VOCAB, C = len(STRINGS), 3
MODULES = [
    {"pattern": "model.layers.*.self_attn.q_proj", "C": C},
    {"pattern": "model.layers.*.self_attn.o_proj", "C": C},
]  # 4 matrices × 3 = 12 subcomponents; flat 0-2 is block 0's q, 3-5 block 0's o


class Strings:
    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids: list[int]) -> str:
        return STRINGS[ids[0]]


@pytest.fixture(scope="module")
def d():
    torch.manual_seed(0)
    return float64_decomposition(tiny_llama(vocab=VOCAB), MODULES)


def _fixed_ci(monkeypatch, d, gs):
    it = iter(gs)

    def fake(xs):
        g, out, offset = next(it), {}, 0
        for path in d.module_paths:
            out[path] = g[..., offset : offset + d.Cs[path]]
            offset += d.Cs[path]
        return out, out

    monkeypatch.setattr(d, "causal_importance", fake)


@pytest.fixture
def case(monkeypatch, d):
    """Random tokens and CI, except that subcomponent 0 fires exactly on "cess" after " prin" (the word princess)."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, VOCAB, (4, 12), generator=gen) for _ in range(3)]
    gs = []
    for b in batches:
        b[:, 4], b[:, 5] = 1, 2  # " prin" "cess" in every row
        b[b == 2] = 2
        b[:, 6:][b[:, 6:] == 2] = 0  # "cess" only after " prin"
        b[:, :4][b[:, :4] == 2] = 0
        g = torch.rand(*b.shape, 4 * C, generator=gen, dtype=torch.float64)
        g = g * (torch.rand(*b.shape, 4 * C, generator=gen) < 0.4)
        g[..., 0] = (b == 2).double() * torch.rand(b.shape, generator=gen, dtype=torch.float64).clamp(min=0.2)
        g[..., 11] = 0.0  # dead
        gs.append(g)
    _fixed_ci(monkeypatch, d, gs)
    h = harvest(d, batches, tokenizer=Strings(), top_k=6, window=4, progress=False)
    return h, batches, gs


def test_contexts_are_top_firings_then_sampled_ones_with_window_starts_last(case, d):
    h, _, _ = case
    ex = examples_from_harvest(h, d, n_contexts=5, window=2)
    assert ex.keys == tuple(h.key(f) for f in h.alive.tolist()) and "1.attn.o:2" not in ex
    starts = h.seq_starts.tolist()

    def position(loc):
        return loc - max(s for s in starts if s <= loc)

    used_reservoir = 0
    for flat in h.alive.tolist():
        top = h.top_examples(flat)
        res = sorted(h.random_examples(flat), key=lambda e: -e.ci)  # stable: slot order among ties
        seen = {e.loc for e in top}
        res = [e for e in res if e.loc not in seen and not seen.add(e.loc)]
        ranked = [(e, True) for e in top] + [(e, False) for e in res]
        want = sorted(ranked, key=lambda pair: position(pair[0].loc) < 2)[:5]
        got = ex.contexts(h.key(flat))
        assert len(got) == len(want) > 0
        for g, (w, is_top) in zip(got, want, strict=True):
            lo = max(0, w.center - 2)
            assert g["tokens"] == w.tokens[lo : w.center + 3]
            assert g["text"] == [STRINGS[t] for t in g["tokens"]]
            assert g["tokens"][g["center"]] == w.tokens[w.center]
            if is_top:  # CI at every token of the window
                assert g["ci"] == pytest.approx(w.ci_window[lo : w.center + 3], abs=1 / 255)
            else:  # a sampled firing carries its CI at the firing token only
                used_reservoir += 1
                assert g["ci"][g["center"]] == pytest.approx(w.ci, abs=1 / 255)
                assert sum(g["ci"]) == pytest.approx(g["ci"][g["center"]])
    assert used_reservoir > 0  # the case exercises both sources


def test_token_lists_cofiring_and_lens_match_independent_counts(case, d):
    h, _, _ = case
    ex = examples_from_harvest(h, d)
    for flat in h.alive.tolist():
        card = ex.card(h.key(flat))
        s = h.input_stats(flat)
        ok = s.count >= 2
        f1 = torch.where(ok, 2 * s.precision * s.recall / (s.precision + s.recall), -1.0)
        assert card["inputs"][0]["id"] == int(s.token[f1.argmax()])
        assert card["inputs"][0]["precision"] == pytest.approx(float(s.precision[f1.argmax()]), rel=1e-3)
        o = h.output_stats(flat)
        eligible = (o.recall >= max(1 / VOCAB, 0.005)) & (o.count > 0)
        if eligible.any():
            best = int(torch.nonzero(eligible).flatten()[o.pmi[eligible].argmax()])
            assert card["outputs"][0]["id"] == best
        co = h.cofiring(flat)
        if len(co.partner):
            assert card["cofiring"][0]["key"] == h.key(int(co.partner[co.jaccard.argmax()]))
            assert card["cofiring"][0]["jaccard"] == pytest.approx(float(co.jaccard.max()), rel=1e-3)
    # The lens: u_c through the final norm's scale and the unembedding, centred; only o (and down) rows have one.
    W_U = d.model.target.lm_head.weight.detach().float()
    gamma = d.model.target.model.norm.weight.detach().float()
    for key in ex.keys:
        card = ex.card(key)
        block, _, rest = key.split(".", 2)
        if not rest.startswith("o:"):
            assert card["promotes"] == [] and card["suppresses"] == []
            continue
        c = int(rest.split(":")[1])
        U = d.model.components(f"model.layers.{block}.self_attn.o_proj").U.detach().float()
        logits = (U[c] * gamma) @ W_U.T
        logits = logits - logits.mean()
        assert card["promotes"][0]["id"] == int(logits.argmax())
        assert card["suppresses"][0]["id"] == int(logits.argmin())
        assert card["promotes"][0]["logit"] == pytest.approx(float(logits.max()), rel=1e-2)


def test_words_join_fragments_and_reach_the_label(case, d):
    h, _, _ = case
    ex = examples_from_harvest(h, d)
    card = ex.card("0.attn.q:0")
    assert card["words"] == [["princess", 1.0]]  # every firing of subcomponent 0 is "cess" in " prin"+"cess"
    assert card["inputs"][0]["token"] == "cess" and card["inputs"][0]["precision"] == 1.0
    assert ex.labels["0.attn.q:0"].startswith("fires on 100% of 'cess' in princess")
    assert ex.labels["0.attn.q:0"] == card_label(card)


def test_round_trip_and_refusals(case, d, tmp_path):
    h, _, _ = case
    ex = examples_from_harvest(h, d, made={"command": "test"})
    folder = ex.save(tmp_path)
    assert folder == tmp_path / EXAMPLES_DIR and examples_path(tmp_path) == folder
    back = load_examples(tmp_path)
    assert back.keys == ex.keys and back.made["command"] == "test" and back.labels == ex.labels
    for key in ex.keys:
        assert back.card(key) == ex.card(key)
    cards = cards_for(tmp_path, [ex.keys[0], "9.attn.q:0"])
    assert list(cards) == [ex.keys[0]]  # unknown keys are skipped
    with pytest.raises(VpdError, match=r"holds no examples/ folder; run `vpd harvest"):
        load_examples(tmp_path / "nothing")
    meta = json.loads((folder / "examples.json").read_text())
    (folder / "examples.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ArtifactFormatError, match="format_version 99"):
        load_examples(tmp_path)
    (folder / "examples.json").write_text(json.dumps(meta))
    data = bytearray((folder / "examples.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "examples.safetensors").write_bytes(bytes(data))
    with pytest.raises(DamagedArtifactError):
        load_examples(tmp_path)


def test_the_bundled_run_ships_examples_within_5_mb():
    from decomposer.vpd.bundle import bundled_run_path

    folder = examples_path(bundled_run_path())
    assert folder is not None
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size <= 5 * 2**20
    ex = load_examples(bundled_run_path())
    assert len(ex) > 4000 and ex.n_contexts == 10 and ex.made["n_tokens"] >= 65_536
    with_contexts = sum(bool(ex.contexts(k, 1)) for k in ex.keys)
    assert with_contexts == len(ex)  # every alive subcomponent has at least one context
    labelled = sum(bool(ex.labels.get(k)) for k in ex.keys)
    assert labelled / len(ex) > 0.95

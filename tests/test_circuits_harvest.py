"""Harvest statistics against hand and brute-force counts; artifacts, labels, cards, the CLI.

The CI is under the test's control: `d.causal_importance` is replaced by a function that returns fixed
tensors, batch after batch, so every firing is known in advance.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from attrgraph.harvest_format import harvest_meta_path
from attrgraph.labels import (
    label_for,
    labels_for_run,
    merge_labels,
    read_label_file,
    summary_label,
)
from circuits.cli import main
from circuits.component import component_card, render_component_html
from circuits.harvest import harvest, load_harvest, save_harvest
from circuits.harvest.accumulate import _at_most_per_group, _reservoir_offer
from circuits.labeller import StatsLabeller, label_components
from decomposer.errors import ArtifactFormatError, DamagedArtifactError, VpdError
from decomposer.integrity import file_sha256
from tests.conftest import float64_decomposition, tiny_llama

VOCAB, C = 12, 3
MODULES = [{"pattern": "model.layers.*.self_attn.q_proj", "C": C}]  # 2 matrices → 6 subcomponents
SCRIPT = "</script><script>alert(1)</script>"


class FakeTokenizer:
    """Decodes id i to `t{i}`, except id 3, which is a hostile string for the HTML test."""

    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids: list[int]) -> str:
        return SCRIPT if ids[0] == 3 else f"t{ids[0]}"


@pytest.fixture(scope="module")
def d():
    torch.manual_seed(0)
    return float64_decomposition(tiny_llama(vocab=VOCAB), MODULES)


def fixed_ci(monkeypatch, d, gs: list[torch.Tensor]) -> None:
    """Make `d.causal_importance` return gs[0], gs[1], … (each (B, T, C_total)) on successive calls.

    The tensors are float64 like the decomposition, so that a CI of exactly 0.1 is not above τ = 0.1.
    """
    it = iter(gs)

    def fake(xs):
        g = next(it)
        out, offset = {}, 0
        for path in d.module_paths:
            out[path] = g[..., offset : offset + d.Cs[path]]
            offset += d.Cs[path]
        return out, out

    monkeypatch.setattr(d, "causal_importance", fake)


def reference_acts(d, tokens: torch.Tensor) -> torch.Tensor:
    """a·‖u_c‖ = (v_cᵀ x)·‖u_c‖ from inputs captured by plain forward hooks on the target (B, T, C_total)."""
    captured = {}
    hooks = [
        d.model.target.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: captured.__setitem__(p, a[0]))
        for p in d.module_paths
    ]
    with torch.no_grad():
        d.model.target(tokens)
    for h in hooks:
        h.remove()
    parts = []
    for p in d.module_paths:
        comp = d.model.components(p)
        parts.append((captured[p] @ comp.V) * comp.U.norm(dim=1))
    return torch.cat(parts, -1).detach()


def target_probs(d, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(d.model.target(tokens).logits.float(), -1)


def run(monkeypatch, d, batches, gs, **kw):
    fixed_ci(monkeypatch, d, gs)
    return harvest(d, batches, progress=False, **kw)


# ---------------------------------------------------------------------------------------------------
# Statistics


def test_hand_counted_example(monkeypatch, d):
    tokens = torch.tensor([[5, 7, 5, 9, 5, 7]])
    g = torch.zeros(1, 6, 6, dtype=torch.float64)
    g[0, :, 0] = torch.tensor(
        [0.9, 0.05, 0.5, 0.2, 0.0, 0.0], dtype=torch.float64
    )  # fires at t = 0, 2, 3 (tokens 5, 5, 9)
    g[0, :, 1] = torch.tensor([0.0, 0.0, 0.3, 0.3, 0.1, 0.0], dtype=torch.float64)  # fires at t = 2, 3; 0.1 is not > τ
    h = run(monkeypatch, d, [tokens], [g], tau_fire=0.1)
    N = 6
    assert h.n_tokens == N and h.firing_count.tolist() == [3, 2, 0, 0, 0, 0]
    assert h.alive.tolist() == [0, 1]  # subcomponents 2–5 never fire: dead
    # density F/N = 3/6; mean CI = (0.9 + 0.05 + 0.5 + 0.2) / 6 = 0.275 (non-firing CI counts too)
    assert float(h.density[0]) == 0.5 and float(h.mean_ci[0]) == pytest.approx(0.275, abs=1e-12)
    assert float(h.mean_ci[1]) == pytest.approx(0.7 / 6, abs=1e-12)
    s = h.input_stats(0)
    assert s.token.tolist() == [5, 9] and s.count.tolist() == [2, 1]
    # token 5: n = 2, T = 3 → recall 2/3, precision 2/3, lift (2/3)/(3/6) = 4/3, PMI log(2·6/(3·3)) = log 4/3
    # token 9: n = 1, T = 1 → recall 1/3, precision 1, lift 2, PMI log(1·6/(3·1)) = log 2
    assert s.recall.tolist() == pytest.approx([2 / 3, 1 / 3])
    assert s.precision.tolist() == pytest.approx([2 / 3, 1.0])
    assert s.lift.tolist() == pytest.approx([4 / 3, 2.0])
    assert s.pmi.tolist() == pytest.approx([math.log(4 / 3), math.log(2)])
    # co-firing (0, 1): c_01 = 2 (t = 2, 3); precision 2/3, recall 2/2, Jaccard 2/(3+2−2), PMI log(2·6/(3·2))
    co = h.cofiring(0)
    assert co.partner.tolist() == [1] and co.count.tolist() == [2]
    assert [float(co.precision[0]), float(co.recall[0]), float(co.jaccard[0])] == pytest.approx([2 / 3, 1, 2 / 3])
    assert float(co.pmi[0]) == pytest.approx(math.log(2))
    assert h.cofiring(1).partner.tolist() == [0] and len(h.cofiring(4).partner) == 0
    # output mass: n_cv = Σ over t = 0, 2, 3 of p(next = v); T_v = Σ over all six positions
    p = target_probs(d, tokens)[0]
    out = h.output_stats(0)
    assert torch.allclose(out.count, p[[0, 2, 3]].sum(0).double(), rtol=1e-6)
    assert torch.allclose(h.output_total, p.sum(0).double(), rtol=1e-6)
    assert torch.allclose(out.pmi, torch.log(p[[0, 2, 3]].sum(0) * N / (3 * p.sum(0))).double(), atol=1e-5)


def brute_force(tokens_list, gs, probs_list, tau):
    """Firing counts, input pairs, output mass and co-firing by explicit loops over every position."""
    Ct = gs[0].shape[-1]
    F, ci_sum, n_in, T_in, c_ij = [0] * Ct, [0.0] * Ct, {}, {}, {}
    n_out, T_out, N = torch.zeros(Ct, VOCAB, dtype=torch.float64), torch.zeros(VOCAB, dtype=torch.float64), 0
    for tokens, g, probs in zip(tokens_list, gs, probs_list, strict=True):
        B, T = tokens.shape
        for b in range(B):
            for t in range(T):
                N += 1
                v = int(tokens[b, t])
                T_in[v] = T_in.get(v, 0) + 1
                T_out += probs[b, t].double()
                fired = [c for c in range(Ct) if g[b, t, c] > tau]
                for c in range(Ct):
                    ci_sum[c] += float(g[b, t, c])
                for c in fired:
                    F[c] += 1
                    n_in[c, v] = n_in.get((c, v), 0) + 1
                    n_out[c] += probs[b, t].double()
                    for c2 in fired:
                        c_ij[c, c2] = c_ij.get((c, c2), 0) + 1
    return N, F, ci_sum, n_in, T_in, n_out, T_out, c_ij


@pytest.fixture
def random_case(d):
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, shape, generator=gen) for shape in ((3, 7), (2, 5), (1, 4))]
    gs = []
    for b in batches:
        g = torch.rand(*b.shape, 6, generator=gen, dtype=torch.float64)
        g = g * (torch.rand(*b.shape, 6, generator=gen) < 0.45)
        g[..., 4] = 0.0  # dead
        g[..., 5] = (g[..., 5] > 0).double() * 0.1  # CI exactly τ: never fires, but adds to the mean CI
        gs.append(g)
    gs[0][..., 2:4] = 0.0  # 2 and 3 start firing in the second batch: new rows mid-pass
    gs[2][..., 1:] = 0.0  # one of four rows fires in the last batch: the scatter update
    return batches, gs


def test_statistics_match_brute_force(monkeypatch, d, random_case):
    batches, gs = random_case
    h = run(monkeypatch, d, batches, gs, tau_fire=0.1)
    probs = [target_probs(d, b) for b in batches]
    N, F, ci_sum, n_in, T_in, n_out, T_out, c_ij = brute_force(batches, gs, probs, 0.1)
    assert h.n_tokens == N == 35
    assert h.firing_count.tolist() == F and F[4] == F[5] == 0
    assert h.mean_ci.tolist() == pytest.approx([s / N for s in ci_sum]) and float(h.mean_ci[5]) > 0
    assert h.density.tolist() == pytest.approx([f / N for f in F])
    alive = [c for c in range(6) if F[c] > 0]
    assert h.alive.tolist() == alive
    assert torch.allclose(h.output_total, T_out, rtol=1e-6)
    for c in alive:
        s = h.input_stats(c)
        expected = sorted(v for (c2, v) in n_in if c2 == c)
        assert s.token.tolist() == expected
        for i, v in enumerate(expected):
            n, T = n_in[c, v], T_in[v]
            assert int(s.count[i]) == n
            assert float(s.recall[i]) == pytest.approx(n / F[c])
            assert float(s.precision[i]) == pytest.approx(n / T)
            assert float(s.lift[i]) == pytest.approx((n / T) / (F[c] / N))
            assert float(s.pmi[i]) == pytest.approx(math.log(n * N / (F[c] * T)))
        o = h.output_stats(c)
        assert torch.allclose(o.count, n_out[c], rtol=1e-5)
        assert torch.allclose(o.precision, n_out[c] / T_out, rtol=1e-5)
        assert torch.allclose(o.recall, n_out[c] / F[c], rtol=1e-5)
        assert torch.allclose(o.lift, (n_out[c] / T_out) / (F[c] / N), rtol=1e-5)
        assert torch.allclose(o.pmi, torch.log(n_out[c] * N / (F[c] * T_out)), rtol=1e-5, atol=1e-6)
        co = h.cofiring(c)
        partners = [j for j in alive if j != c and c_ij.get((c, j), 0) > 0]
        assert co.partner.tolist() == partners
        for i, j in enumerate(partners):
            n = c_ij[c, j]
            assert int(co.count[i]) == n
            assert float(co.precision[i]) == pytest.approx(n / F[c])
            assert float(co.recall[i]) == pytest.approx(n / F[j])
            assert float(co.jaccard[i]) == pytest.approx(n / (F[c] + F[j] - n))
            assert float(co.pmi[i]) == pytest.approx(math.log(n * N / (F[c] * F[j])))
    # The stored co-firing matrix covers alive subcomponents only; its diagonal is F_c.
    assert h.cofire.shape == (len(alive), len(alive)) and h.cofire.diagonal().tolist() == [F[c] for c in alive]
    assert len(h.input_stats(4).token) == 0 and len(h.cofiring(4).partner) == 0 and h.top_examples(4) == []


def test_row_growth_does_not_change_the_counts(monkeypatch, d, random_case):
    batches, gs = random_case
    h = run(monkeypatch, d, batches, gs, top_k=2, reservoir=3)
    monkeypatch.setattr("circuits.harvest.accumulate._MIN_ROW_GROWTH", 0)  # grow the row state one step at a time
    grown = run(monkeypatch, d, batches, gs, top_k=2, reservoir=3)
    for name in ("firing_count", "alive", "output_mass", "cofire", "top_loc", "top_ci", "res_loc", "res_offered"):
        assert torch.equal(getattr(grown, name), getattr(h, name)), name


def test_top_examples_are_the_highest_ci_firings(monkeypatch, d, random_case):
    batches, gs = random_case
    k, w = 3, 2
    h = run(monkeypatch, d, batches, gs, tau_fire=0.1, top_k=k, window=w)
    acts = [reference_acts(d, b) for b in batches]
    firings = {}  # c → [(ci, |act|, loc, b, t, batch)]
    base = 0
    for i, (tokens, g) in enumerate(zip(batches, gs, strict=True)):
        B, T = tokens.shape
        for b in range(B):
            for t in range(T):
                for c in range(6):
                    if g[b, t, c] > 0.1:
                        firings.setdefault(c, []).append(
                            (float(g[b, t, c]), abs(float(acts[i][b, t, c])), base + b * T + t, b, t, i)
                        )
        base += B * T
    for c, fs in firings.items():
        best = sorted(fs, key=lambda f: (-f[0], -f[1], f[2]))[:k]
        examples = h.top_examples(c)
        assert [e.loc for e in examples] == [f[2] for f in best]
        for e, (ci, _, _, b, t, i) in zip(examples, best, strict=True):
            T = batches[i].shape[1]
            lo, hi = max(0, t - w), min(T, t + w + 1)
            assert e.tokens == batches[i][b, lo:hi].tolist() and e.center == t - lo
            assert e.ci_window == pytest.approx(gs[i][b, lo:hi, c].tolist(), abs=1e-7)
            assert e.act_window == pytest.approx(acts[i][b, lo:hi, c].tolist(), rel=1e-5, abs=1e-6)
            assert e.ci == pytest.approx(ci, abs=1e-7)


def test_top_example_ties_go_to_the_larger_activation(monkeypatch, d):
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    acts = reference_acts(d, tokens)[0, :, 0].abs()
    g = torch.zeros(1, 6, 6, dtype=torch.float64)
    g[0, [1, 3, 4], 0] = 1.0  # three firings at CI 1: the two with the larger |a·‖u‖| win
    h = run(monkeypatch, d, [tokens], [g], top_k=2, window=0)
    expected = sorted([1, 3, 4], key=lambda t: -float(acts[t]))[:2]
    assert [e.loc for e in h.top_examples(0)] == expected
    assert all(e.tokens == [int(tokens[0, e.loc])] and e.center == 0 for e in h.top_examples(0))


def test_reservoir_respects_its_caps(monkeypatch, d):
    batches = [torch.randint(0, VOCAB, (2, 7)) for _ in range(3)]
    gs = []
    for _ in batches:
        g = torch.zeros(2, 7, 6, dtype=torch.float64)
        g[..., 0] = 0.8  # fires at all 14 positions of every batch
        g[0, :3, 1] = 0.5  # fires at 3 positions per batch
        gs.append(g)
    h = run(monkeypatch, d, batches, gs, reservoir=1000, per_batch=5)
    ex0, ex1 = h.random_examples(0), h.random_examples(1)
    assert len(ex0) == 15 and len(ex1) == 9  # 5 of 14 and 3 of 3 per batch, three batches
    assert h.res_offered.tolist() == [15, 9]
    for batch in range(3):  # at most 5 from each batch of 14 positions
        assert sum(14 * batch <= e.loc < 14 * (batch + 1) for e in ex0) == 5
    assert len({e.loc for e in ex0}) == 15
    assert {e.loc % 14 for e in ex1} <= {0, 1, 2}  # only real firings
    for e in ex0:
        b, t = divmod(e.loc % 14, 7)
        tokens = batches[e.loc // 14]
        assert e.ci == pytest.approx(0.8) and e.tokens[e.center] == int(tokens[b, t])
        assert e.tokens == tokens[b, max(0, t - 20) : t + 21].tolist()
    small = run(monkeypatch, d, batches, gs, reservoir=4, per_batch=5)
    ex = small.random_examples(0)
    assert len(ex) == 4 and len({e.loc for e in ex}) == 4 and small.res_offered.tolist() == [15, 9]


def test_reservoir_sampling_is_uniform():
    gen = torch.Generator().manual_seed(0)
    trials, R, n_items = 4000, 2, 6
    loc = torch.full((trials, R), -1, dtype=torch.long)
    offered = torch.zeros(trials, dtype=torch.long)
    rows = torch.arange(trials)
    for item in range(n_items):
        _reservoir_offer(loc, offered, rows, torch.full((trials,), item), gen)
    freq = torch.stack([(loc == item).any(1).double().mean() for item in range(n_items)])
    assert (loc >= 0).all() and torch.allclose(freq, torch.full_like(freq, R / n_items), atol=0.03)  # σ ≈ 0.0075
    groups = torch.arange(trials).repeat_interleave(10)
    chosen, draw = _at_most_per_group(groups, 5, gen)
    assert torch.bincount(groups[chosen]).tolist() == [5] * trials and draw.max() == 4
    freq = torch.bincount(chosen % 10, minlength=10).double() / trials
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.03)


def test_bad_settings_and_batches(monkeypatch, d):
    with pytest.raises(VpdError, match="`tau_fire` must be in"):
        harvest(d, [torch.zeros(1, 2, dtype=torch.long)], tau_fire=1.5, progress=False)
    with pytest.raises(VpdError, match="`reservoir` must be an int >= 1"):
        harvest(d, [torch.zeros(1, 2, dtype=torch.long)], reservoir=0, progress=False)
    with pytest.raises(VpdError, match=r"`token_batches\[0\]` must be a non-empty"):
        harvest(d, [torch.zeros(4)], progress=False)
    with pytest.raises(VpdError, match="outside"):
        harvest(d, [torch.full((1, 2), VOCAB)], progress=False)
    with pytest.raises(VpdError, match="`token_batches` is empty"):
        harvest(d, [], progress=False)


# ---------------------------------------------------------------------------------------------------
# Artifact, labels, cards


@pytest.fixture
def saved(monkeypatch, d, random_case, tmp_path):
    batches, gs = random_case
    batches = [b.clone() for b in batches]
    batches[0][0, 2] = 3  # the hostile token, at a position where subcomponent 0 fires
    gs = [g.clone() for g in gs]
    gs[0][0, 2, 0] = 1.0  # above every other CI (torch.rand < 1): the top example
    fixed_ci(monkeypatch, d, gs)
    h = harvest(d, batches, tokenizer=FakeTokenizer(), top_k=4, window=3, progress=False)
    save_harvest(h, tmp_path)
    return h, tmp_path, batches, gs


def test_save_load_round_trip(saved):
    h, folder, *_ = saved
    meta = json.loads((folder / "harvest" / "harvest.json").read_text())
    assert meta["format"] == "harvest" and meta["format_version"] == 1
    assert meta["tau_fire"] == 0.1 and meta["n_tokens"] == 35 and meta["tokens_per_s"] > 0
    assert set(meta["components"]) == {h.key(f) for f in h.alive.tolist()}
    top = meta["components"]["0.attn.q:0"]
    assert top["density"] == pytest.approx(float(h.density[0])) and top["input"][0]["token"] is not None
    assert top["top_examples"][0]["ci"] == 1.0 and 3 in top["top_examples"][0]["tokens"]
    back = load_harvest(folder)
    for name in (
        "firing_count",
        "ci_sum",
        "input_comp",
        "input_token",
        "input_count",
        "output_mass",
        "cofire",
        "top_loc",
        "top_ci",
        "top_act",
        "res_loc",
        "res_ci",
        "res_act",
        "tokens",
        "seq_starts",
    ):
        assert torch.equal(getattr(back, name), getattr(h, name)), name
    assert (back.module_paths, back.Cs, back.vocab, back.tau_fire) == (h.module_paths, h.Cs, h.vocab, h.tau_fire)
    assert back.summary(0) == h.summary(0)


def test_unknown_format_version_is_refused(saved):
    _, folder, *_ = saved
    path = folder / "harvest" / "harvest.json"
    path.write_text(path.read_text().replace('"format_version":1', '"format_version":99'))
    for read in (load_harvest, labels_for_run):
        with pytest.raises(ArtifactFormatError, match="format_version 99") as err:
            read(folder)
        assert str(err.value).count(". ") == 0  # one sentence
    with pytest.raises(VpdError, match="No harvest in"):
        load_harvest(folder / "nothing")


def test_a_cut_short_tensors_file_is_refused_naming_it(saved):
    _, folder, *_ = saved
    meta = json.loads((folder / "harvest" / "harvest.json").read_text())
    tensors = folder / "harvest" / "harvest.safetensors"
    assert meta["files"] == {"harvest.safetensors": file_sha256(tensors)}
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(DamagedArtifactError, match=r"harvest\.safetensors is damaged: .*; run `vpd harvest` again\.$"):
        load_harvest(folder)


def test_labels_from_harvest(saved, tmp_path_factory):
    h, folder, batches, gs = saved
    labels = labels_for_run(folder)
    assert labels == {h.key(f): summary_label(h.summary(f)) for f in h.alive.tolist()}
    s = h.summary(0)
    # The input part starts with the token subcomponent 0 fires on most often (ties: the lower id).
    fired = torch.cat([b[g[..., 0] > 0.1] for b, g in zip(batches, gs, strict=True)])
    counts = torch.bincount(fired, minlength=VOCAB)
    assert s["input"][0]["id"] == int(counts.argmax()) and s["input"][0]["count"] == int(counts.max())
    # The label starts with the token it is most specific to: top precision among tokens with ≥ 2 firings
    # that make up ≥ 1% of them.
    i = h.input_stats(0)
    eligible = (i.count >= 2) & (i.recall >= 0.01)
    specific = int(i.token[eligible][i.precision[eligible].argmax()])
    assert s["input_precision"][0]["id"] == specific
    assert labels["0.attn.q:0"].startswith(f"fires on {FakeTokenizer().decode([specific])!r}")
    # The top output token is the top-PMI token among those with mean predicted probability ≥ 1/vocab.
    o = h.output_stats(0)
    ok = o.recall >= 1 / VOCAB
    best = int(torch.nonzero(ok).flatten()[o.pmi[ok].argmax()])
    assert labels["0.attn.q:0"].split(" → writes ")[1].startswith(repr(FakeTokenizer().decode([best])))
    # The other ranked lists: top input PMI among tokens with ≥ 2 firings, lowest output PMI among tokens
    # with mean predicted probability ≥ 1/vocab, co-firing partners by Jaccard.
    i = h.input_stats(0)
    enough = i.count >= 2
    assert s["input_pmi"][0]["id"] == int(i.token[enough][i.pmi[enough].argmax()])
    common = h.output_total / h.n_tokens >= 1 / VOCAB
    assert s["output_bottom"][0]["id"] == int(torch.nonzero(common).flatten()[o.pmi[common].argmin()])
    co = h.cofiring(0)
    assert s["cofiring"][0]["key"] == h.key(int(co.partner[co.jaccard.argmax()]))
    assert s["cofiring"][0]["jaccard"] == pytest.approx(float(co.jaccard.max()), rel=1e-5)
    assert StatsLabeller().label(s) == labels["0.attn.q:0"]
    assert label_components(h, StatsLabeller(), ["0.attn.q:0"]) == {"0.attn.q:0": labels["0.attn.q:0"]}
    assert labels_for_run(tmp_path_factory.mktemp("empty")) == {}


def test_summary_label_rule():
    def tok(i, token, **rates):
        return {"id": i, "token": token, **rates}

    specific = [tok(1, ":", precision=0.9), tok(2, ";", precision=0.8), tok(3, "=", precision=0.5)]
    specific += [tok(4, " the", precision=0.44), tok(5, "x", precision=0.43)]
    frequent = [tok(4, " the", recall=0.6), tok(1, ":", recall=0.1)]
    writes = [tok(6, "o", pmi=3.0), tok(7, ")", pmi=2.5), tok(8, "z", pmi=2.0)]
    summary = {"input": frequent, "input_precision": specific, "output": writes}
    # The three most specific inputs within 2x of the top; outputs within log 2 of the top PMI.
    assert summary_label(summary) == "fires on ':' ';' '=' → writes 'o' ')'"
    assert summary_label({**summary, "input_precision": []}) == "fires on ' the' → writes 'o' ')'"  # by recall
    pmi_only = {"input_pmi": [tok(1, ":", pmi=4.0), tok(2, ";", pmi=3.5), tok(3, "=", pmi=3.0)]}  # 3.0 < 4 - log 2
    assert summary_label(pmi_only) == "fires on ':' ';'"
    assert summary_label({"output": [tok(9, "q", pmi=-0.5)]}) == ""  # never names a token it makes less likely
    assert summary_label({"input": [tok(1, None, recall=0.7), tok(2, "x", recall=0.3)]}) == "fires on #1"
    assert summary_label({}) == ""


def test_label_files(tmp_path):
    node = "comp/model.layers.1.self_attn.q_proj/31@4"
    good = tmp_path / "l.json"
    good.write_text(json.dumps({"1.attn.q:31": "her", node: "her at 4"}))
    assert read_label_file(good) == {"1.attn.q:31": "her", node: "her at 4"}
    csv_file = tmp_path / "l.csv"
    csv_file.write_text('node,label\n1.attn.q:31,pronoun\n2.mlp.down:7,"a, b"\n')
    assert read_label_file(csv_file) == {"1.attn.q:31": "pronoun", "2.mlp.down:7": "a, b"}
    merged = merge_labels(read_label_file(good), read_label_file(csv_file))
    assert merged["1.attn.q:31"] == "pronoun" and merged[node] == "her at 4"  # the later dict wins
    assert label_for(merged, node) == "her at 4"
    assert label_for(merged, "comp/model.layers.1.self_attn.q_proj/31@0") == "pronoun"  # by component key
    assert label_for(merged, "emb@0") is None
    bad = {
        "missing.json": (None, "does not exist"),
        "broken.json": ("{'a': 1", "is not valid JSON"),
        "list.json": ("[1, 2]", "holds a JSON list"),
        "number.json": ('{"1.attn.q:31": 3}', "labels must be strings"),
        "key.json": ('{"no such node": "x"}', "is neither a component key"),
        "cols.csv": ("id,text\n1.attn.q:31,x\n", "lacks the column"),
        "row.csv": ("node,label\nemb@x,y\n", "row 2 key 'emb@x'"),
        "labels.txt": ("x", "pass a .json or .csv file"),
    }
    for name, (text, message) in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(VpdError, match=message) as err:
            read_label_file(tmp_path / name)
        assert "\n" not in str(err.value)


def test_component_card_and_html(saved, d, tmp_path):
    h, *_ = saved
    card = component_card(d, h, "0.attn.q:0")
    comp = d.model.components(d.module_paths[0])
    assert card.data["u_norm"] == pytest.approx(float(comp.U[0].detach().norm()))
    assert card.data["v_norm"] == pytest.approx(float(comp.V[:, 0].detach().norm()))
    assert (card.data["d_out"], card.data["d_in"]) == tuple(comp.weight.shape)
    assert card.data["density"] == pytest.approx(float(h.density[0])) and card.data["alive"]
    assert f"density {float(h.density[0]):.5f}" in card.text and "[[" in card.text
    assert card.data["top_examples"][0]["text"][card.data["top_examples"][0]["center"]] == SCRIPT
    page = render_component_html(card, tmp_path / "c.html").read_text()
    assert SCRIPT not in page and "<script" not in page
    assert html_escaped(SCRIPT) in page
    for remote in ("http://", "https://", "src=", "<link", "url("):
        assert remote not in page
    assert "class='fire'" in page and "rgba(255, 140, 0, 1.000)" in page  # the firing token, shaded by its CI
    dead = component_card(d, h, h.key(4))  # subcomponent 4 never fires
    assert not dead.data["alive"] and "never fired" in dead.text
    assert "Never fired" in render_component_html(dead, tmp_path / "dead.html").read_text()
    with pytest.raises(VpdError, match="names no subcomponent"):
        component_card(d, h, "7.mlp.up:0")
    other = float64_decomposition(tiny_llama(vocab=VOCAB), MODULES, seed=5)
    with pytest.raises(VpdError, match="another decomposition"):
        component_card(other, h, "0.attn.q:0")


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


# ---------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    """A two-subcomponent decomposition of the bundled target, untrained, saved as a run folder."""
    from decomposer.target.loading import load_target
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition, save_state

    root = tmp_path_factory.mktemp("hrun")
    config = DecomposeConfig.model_validate(
        {
            "target": "bundled",
            "data_dir": str(root / "no-corpus"),  # no corpus: held-out text is the bundled sample
            "modules": [{"pattern": "model.layers.0.self_attn.q_proj", "C": 2}],
            "ci": {"kind": "mlp", "hidden": 4},
            "optim": {"batch_size": 2, "seq_len": 16},
        }
    )
    target, _ = load_target("bundled")
    d = Decomposition.create(config, target)
    save_state(root / "run", d, step=0, target_name="bundled", train_state={})
    return root / "run"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_harvest_then_component(bundled_run, tmp_path, capsys, monkeypatch):
    assert main(["component", "--run", str(bundled_run), "0.attn.q:0"]) == 2
    assert "run `vpd harvest --run" in one_line_error(capsys)
    assert main(["harvest", "--run", str(bundled_run), "--tokens", "48", "--batch-size", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tokens"] == 48 and summary["tokens_per_s"] > 0 and summary["C_total"] == 2  # 3 windows of 16
    assert (bundled_run / "harvest" / "harvest.safetensors").is_file()
    h = load_harvest(bundled_run)
    alive = h.alive.tolist()
    key = h.key(alive[0]) if alive else "0.attn.q:0"
    assert main(["component", "--run", str(bundled_run), key, "--out", str(tmp_path / "c.html"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["key"] == key and (tmp_path / "c.html").is_file()
    assert main(["component", "--run", str(bundled_run), key]) == 0
    assert f"{key} — model.layers.0.self_attn.q_proj" in capsys.readouterr().out
    assert (bundled_run / "components" / f"{key.replace(':', '_')}.html").is_file()
    assert main(["component", "--run", str(bundled_run), "9.attn.q:0"]) == 2
    assert "names no subcomponent" in one_line_error(capsys)
    monkeypatch.setattr("circuits.commands.harvest._writable", lambda folder: False)
    assert main(["harvest", "--run", str(bundled_run), "--tokens", "16"]) == 2
    assert "`--out` is required because the run folder" in one_line_error(capsys)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["harvest", "--run", "/no/such/run"], "`--run` '/no/such/run' does not exist"),
        (["harvest", "--run", "x", "--tokens", "0"], "`--tokens` must be at least 1"),
        (["harvest", "--run", "x", "--batch-size", "-1"], "`--batch-size` must be at least 1"),
        (["harvest", "--run", "x", "--tau", "1.5"], "`--tau` must be in [0, 1)"),
        (["component", "--run", "/no/such/run", "1.attn.q:0"], "`--run` '/no/such/run' does not exist"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    assert message in one_line_error(capsys)


def test_vpd_graph_hover_cards_come_from_the_runs_harvest(bundled_run, tmp_path, capsys):
    if harvest_meta_path(bundled_run) is None:
        assert main(["harvest", "--run", str(bundled_run), "--tokens", "48", "--batch-size", "2", "--json"]) == 0
    # Thresholds of 1 keep every node: this run's two q subcomponents carry little influence.
    args = ["graph", "--run", str(bundled_run), "--prompt", "The princess lost her crown", "--json"]
    args += ["--node-threshold", "1.0", "--edge-threshold", "1.0"]
    assert main([*args, "--out", str(tmp_path / "g")]) == 0
    html = Path(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"]["html"]).read_text()
    payload = json.loads(re.search(r'<script type="application/json" id="vpd-data">(.*?)</script>', html, re.S)[1])
    assert payload["cards"] and any(card["contexts"] for card in payload["cards"].values())
    assert main([*args, "--out", str(tmp_path / "h"), "--harvest", str(tmp_path / "none")]) == 2
    assert "`--harvest`" in one_line_error(capsys) and not (tmp_path / "h").exists()

"""Static q/k strengths, head norms, densities, the previous-token pair, the q ablation and `vpd qk`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from attrgraph.attention import rope_cos_sin, rope_of
from attrgraph.nodes import resolve_component
from attrgraph.qk import score_terms
from circuits.qk.plots import plot_attention_ablation, plot_offset_attention, plot_static_strength
from circuits.qk.static import (
    FiringStats,
    ablation_attention_effect,
    activation_signs,
    densities,
    find_previous_token_pair,
    firing_stats,
    head_norms,
    mean_attention_by_offset,
    static_strength,
)
from decomposer.errors import VpdError
from tests.conftest import ROPE_VOCAB as VOCAB
from tests.conftest import rope_decomposition as decomposition

MAX_OFFSET = 6


@pytest.fixture(scope="module", params=["mha", "gqa"])
def d(request):
    return decomposition(request.param)


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(1, VOCAB, (3, 7), generator=gen) for _ in range(2)]


def _rot(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's own rotate-half RoPE of one (d_head,) vector at one position."""
    out, _ = apply_rotary_pos_emb(x.view(1, 1, 1, -1), x.view(1, 1, 1, -1), cos[None], sin[None])
    return out.flatten()


def test_static_strength_is_relative_rope_and_plain_at_zero(d):
    layer = 1
    signs = {p: torch.where(torch.arange(8) % 3 == 0, -1.0, 1.0).double() for p in d.module_paths}
    st = static_strength(d, layer, signs=signs, max_offset=MAX_OFFSET)
    q, k = (d.model.components(p) for p in (st.q_path, st.k_path))
    H, dh = st.S.shape[0], q.d_out // st.S.shape[0]
    groups = H // (k.d_out // dh)
    assert st.S.shape == (H, MAX_OFFSET + 1, 8, 8) and st.offsets.tolist() == list(range(MAX_OFFSET + 1))
    rope = rope_of(d)
    with torch.no_grad():
        for h in range(H):
            kv = h // groups
            for c, c_k in [(0, 1), (3, 3), (5, 7)]:
                u_q = signs[st.q_path][c] * q.V[:, c].norm() * q.U[c, h * dh : (h + 1) * dh]
                u_k = signs[st.k_path][c_k] * k.V[:, c_k].norm() * k.U[c_k, kv * dh : (kv + 1) * dh]
                for tau in range(MAX_OFFSET + 1):
                    for t in (tau, tau + 3, tau + 11):  # several absolute positions: only t − t′ matters
                        cos, sin = rope_cos_sin(rope, torch.tensor([t, t - tau]), head_dim=dh)
                        direct = _rot(u_q, cos[:1], sin[:1]) @ _rot(u_k, cos[1:], sin[1:])
                        assert st.S[h, tau, c, c_k] == pytest.approx(float(direct), rel=1e-10, abs=1e-12)
                # τ = 0: the rotation cancels, leaving the plain dot product times the rope's cos/sin scale².
                assert st.S[h, 0, c, c_k] == pytest.approx(rope.scaling**2 * float(u_q @ u_k), rel=1e-10)
    flat = st.S.flatten(1)
    assert torch.allclose(st.z, (st.S - flat.mean(1).view(-1, 1, 1, 1)) / flat.std(1, correction=0).view(-1, 1, 1, 1))
    assert torch.allclose(st.z.flatten(1).mean(1), torch.zeros(H, dtype=torch.float64), atol=1e-12)
    # σ multiplies each subcomponent: S with signs is σ_Q,c σ_K,c′ times S without.
    plain = static_strength(d, layer, max_offset=MAX_OFFSET)
    assert torch.allclose(st.S, plain.S * signs[st.q_path][:, None] * signs[st.k_path][None, :])
    assert torch.allclose(st.S[:, :, 0, 1], -plain.S[:, :, 0, 1])


def test_head_norms_are_slice_norms(d):
    norms = head_norms(d, 0)
    assert set(norms) == {p for p in d.module_paths if ".layers.0." in p}
    with torch.no_grad():
        for path, value in norms.items():
            comp = d.model.components(path)
            is_o = path.endswith("o_proj")
            dh = comp.d_in // value.shape[1] if is_o else comp.d_out // value.shape[1]
            for c in range(comp.C):
                W = torch.outer(comp.U[c], comp.V[:, c])  # subcomponent c in nn.Linear layout (d_out, d_in)
                for h in range(value.shape[1]):
                    block = W[:, h * dh : (h + 1) * dh] if is_o else W[h * dh : (h + 1) * dh]
                    assert value[c, h] == pytest.approx(float(block.norm()), rel=1e-12)
                    piece = comp.V[h * dh : (h + 1) * dh, c] if is_o else comp.U[c, h * dh : (h + 1) * dh]
                    other = comp.U[c] if is_o else comp.V[:, c]
                    assert value[c, h] == pytest.approx(float(piece.norm() * other.norm()), rel=1e-12)
    n_kv = d.model.target.config.num_key_value_heads
    assert norms["model.layers.0.self_attn.k_proj"].shape == (8, n_kv)
    assert norms["model.layers.0.self_attn.o_proj"].shape == (8, d.model.target.config.num_attention_heads)


def test_densities_and_signs_match_hand_counts(d, batches):
    stats = firing_stats(d, batches)
    assert stats.tokens == 2 * 3 * 7
    fired = {p: torch.zeros(8, dtype=torch.float64) for p in d.module_paths}
    act_sum = {p: torch.zeros(8, dtype=torch.float64) for p in d.module_paths}
    with torch.no_grad():
        for batch in batches:
            for row in batch:  # one window at a time: a different batching must give the same counts
                _, xs = d.model.forward_with_inputs(row[None])
                g, _ = d.causal_importance(xs)
                for p in d.module_paths:
                    for t in range(row.numel()):
                        for c in range(8):
                            if g[p][0, t, c] > 0:
                                fired[p][c] += 1
                                act_sum[p][c] += float(xs[p][0, t] @ d.model.components(p).V[:, c])
    dens = densities(d, batches)
    values = torch.cat([v for v in dens.values()])
    assert ((values > 0) & (values < 1)).sum() > 10  # mixed, so the counts mean something
    for p in d.module_paths:
        assert torch.allclose(dens[p], fired[p] / 42, atol=1e-12)
        expected = torch.where(fired[p] > 0, act_sum[p] / fired[p].clamp(min=1), 0)
        assert torch.allclose(stats.mean_activation[p], expected, atol=1e-10)
        sign = activation_signs(stats)[p]
        assert torch.equal(sign, torch.where(expected < 0, -1.0, 1.0).double())
    with pytest.raises(VpdError, match="`batches` is empty"):
        firing_stats(d, [])
    with pytest.raises(VpdError, match="`batches` must hold"):
        firing_stats(d, [torch.rand(2, 3)])


def _plant_previous_token_pair(d, layer: int, c: int, c_k: int) -> None:
    """Make u_K,c′ ∝ R_1 u_Q,c in every head (large norm), so S(c, c′, τ) ∝ ũ·R_{τ−1}ũ peaks at τ = 1."""
    q, k = (d.model.components(f"model.layers.{layer}.self_attn.{m}_proj") for m in "qk")
    rope = rope_of(d)
    n_heads = d.model.target.config.num_attention_heads
    dh = q.d_out // n_heads
    groups = n_heads // (k.d_out // dh)
    cos, sin = rope_cos_sin(rope, torch.tensor([1.0]), head_dim=dh)
    with torch.no_grad():
        q.V[:, c] = q.V[:, c] / q.V[:, c].norm()
        k.V[:, c_k] = k.V[:, c_k] / k.V[:, c_k].norm()
        for kv in range(k.d_out // dh):
            u = torch.zeros(dh, dtype=torch.float64)  # only the fastest pair (θ_0 = 1 rad per step) rotates it
            u[0], u[dh // 2] = 4.0 + kv, 3.0
            for h in range(kv * groups, (kv + 1) * groups):
                q.U[c, h * dh : (h + 1) * dh] = u
            k.U[c_k, kv * dh : (kv + 1) * dh] = _rot(u, cos, sin)


def test_find_previous_token_pair_finds_a_planted_pair():
    d = decomposition("gqa")
    _plant_previous_token_pair(d, layer=1, c=2, c_k=6)
    density = {p: torch.full((8,), 0.5, dtype=torch.float64) for p in d.module_paths}
    for p, c in (("model.layers.1.self_attn.q_proj", [2, 4]), ("model.layers.1.self_attn.k_proj", [6, 0])):
        density[p][c] = 0.99
    for p in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
        density[p][:] = 0.99  # every layer-0 pair is a candidate
    mean = {p: torch.ones(8, dtype=torch.float64) for p in d.module_paths}
    stats = FiringStats(100, density, mean)
    pair = find_previous_token_pair(d, [], stats=stats, max_offset=MAX_OFFSET)
    assert (pair.layer, pair.q_key, pair.k_key, pair.near_always_on) == (1, "1.attn.q:2", "1.attn.k:6", True)
    assert pair.q_density == 0.99 and pair.margin > 0
    assert int(pair.profile[pair.head].argmax()) == 1 and pair.head in pair.peak_heads
    # Brute force over the candidates of layer 1: the margin is the best z(1) − max_{τ≠1} z(τ) over heads.
    z = static_strength(d, 1, signs=activation_signs(stats), max_offset=MAX_OFFSET).z
    margins = [
        float(z[h, 1, c, c_k] - torch.cat((z[h, :1, c, c_k], z[h, 2:, c, c_k])).max())
        for c in (2, 4)
        for c_k in (6, 0)
        for h in range(z.shape[0])
    ]
    assert pair.margin == pytest.approx(max(margins), rel=1e-12)
    json.dumps(pair.to_dict(), allow_nan=False)

    fallback = find_previous_token_pair(d, [], layer=1, stats=stats, min_density=1.0, max_offset=MAX_OFFSET)
    assert not fallback.near_always_on and fallback.layer == 1  # nobody reaches 100%: the densest are used
    with pytest.raises(VpdError, match="`layer` 3 is not a block"):
        find_previous_token_pair(d, [], layer=3, stats=stats)
    with pytest.raises(VpdError, match="`max_offset` must be an int >= 2"):
        find_previous_token_pair(d, [], stats=stats, max_offset=1)


def test_ablation_effect_matches_the_analytic_attention(tmp_path):
    d = decomposition("gqa", attn_implementation="sdpa")  # attention weights need a switch to eager and back
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    effect = ablation_attention_effect(d, ids, "1.attn.q:3", max_offset=4)
    assert d.model.target.config._attn_implementation == "sdpa"
    assert effect.before.shape == effect.after.shape == (2, 4, 7, 7)
    for b in range(2):
        terms = score_terms(d, ids[b], 1)
        assert torch.allclose(effect.before[b], terms.attention(), atol=1e-6)
        # Ablating q:3 (mask 0, delta on) removes exactly its rotated piece from every query.
        q = terms.q - terms.q_comp[:, :, 3]
        scores = torch.einsum("thd,shd->hts", q, terms.k[:, terms.layout.kv_index]) * terms.layout.scaling
        expected = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        assert torch.allclose(effect.after[b], expected, atol=1e-6)
    assert (effect.after - effect.before).abs().max() > 1e-3  # the ablation did something
    for attn, mean in ((effect.before, effect.mean_before), (effect.after, effect.mean_after)):
        assert mean.shape == (4, 5)
        for h in range(4):
            for tau in range(5):
                values = [float(attn[b, h, t, t - tau]) for b in range(2) for t in range(tau, 7)]
                assert mean[h, tau] == pytest.approx(sum(values) / len(values), rel=1e-12)
    assert mean_attention_by_offset(effect.before, 50).shape == (4, 7)  # offsets stop at T − 1
    json.dumps(effect.to_dict(), allow_nan=False)

    st = static_strength(d, 1, max_offset=MAX_OFFSET)
    for path in (
        plot_static_strength(st, 3, 1, tmp_path / "s.png"),
        plot_attention_ablation(effect, tmp_path / "a.png", sample=1),
        plot_offset_attention(effect, tmp_path / "o.png"),
    ):
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    with pytest.raises(VpdError, match=r"`q_key` '1\.attn\.k:3' is a k subcomponent"):
        ablation_attention_effect(d, ids, "1.attn.k:3")
    with pytest.raises(VpdError, match="names no decomposed matrix; use one of"):
        resolve_component(d.Cs, "1.q:3")
    with pytest.raises(VpdError, match="is not a subcomponent key"):
        resolve_component(d.Cs, "1.attn.q")
    with pytest.raises(VpdError, match="C=8"):
        resolve_component(d.Cs, "1.attn.q:8")


@pytest.fixture
def cli_run(monkeypatch):
    """`load_run` and the held-out text replaced by a tiny float64 decomposition and random tokens."""
    from decomposer.vpd import batches as vpd_batches
    from decomposer.vpd import load as vpd_load

    d = decomposition("mha")
    monkeypatch.setattr(vpd_load, "load_run", lambda run: (d, None, {}))
    held = np.random.default_rng(0).integers(1, VOCAB, 2_000).astype(np.uint16)
    monkeypatch.setattr(vpd_batches, "heldout_tokens", lambda *args, **kwargs: held)
    return d


def test_cli_writes_pngs_and_one_json_object(cli_run, tmp_path, capsys):
    from circuits.cli import main
    from circuits.commands.qk import _print

    assert main(["qk", "--run", "tiny", "--tokens", "200", "--out", str(tmp_path), "--json", "--max-offset", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 7 * 32 and out["pair"]["layer"] in (0, 1)
    assert len(out["attention_at_offset_1"]["before"]) == 2
    saved = json.loads((tmp_path / "qk.json").read_text())
    assert saved["format"] == "qk_analysis" and saved["format_version"] == 1 and saved["pair"] == out["pair"]
    for name in ("static_strength", "attention_ablation", "offset_attention"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    _print(out)
    lines = capsys.readouterr().out.splitlines()
    p = out["pair"]
    assert lines[0].startswith(f"layer {p['layer']}: previous-token pair {p['q']} × {p['k']}")
    before, after = out["attention_at_offset_1"]["before"][1], out["attention_at_offset_1"]["after"][1]
    assert f"  1     {before:>8.3f}{after:>8.3f}" in lines


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layer", "5"], "`--layer` 5 is not a block with decomposed q and k projections; use one of 0, 1."),
        (["--tokens", "0"], "`--tokens` must be at least 1; got 0."),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(cli_run, capsys, argv, message):
    from circuits.cli import main

    assert main(["qk", "--run", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err == f"vpd qk: error: {message}\n"

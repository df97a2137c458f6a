"""The exact q/k score split of one prompt, and the q/k pairs behind a graph's o nodes, on tiny float64 Llamas."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from attrgraph.attention import apply_rope, attention_pattern, rope_cos_sin, rope_of
from attrgraph.edges import attribute_edges
from attrgraph.qk import (
    add_qk_pairs,
    data_dependent_strength,
    qk_pairs_for_o,
    score_decomposition,
    score_terms,
)
from attrgraph.render import render_html
from attrgraph.to_networkx import table_to_networkx
from decomposer.errors import VpdError
from tests.conftest import ROPE_CONFIGS, ROPE_VOCAB, rope_decomposition

VOCAB, T = ROPE_VOCAB, 6
NASTY = "</script><b>&"


@pytest.fixture(scope="module", params=sorted(ROPE_CONFIGS))
def setup(request):
    d = rope_decomposition(request.param)
    ids = torch.randint(1, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    return d, ids


def reference(d, ids, layer: int) -> dict:
    """The model's own q, k, rotation and scores of `layer`, from hooks on a plain target forward."""
    attn = d.model.target.model.layers[layer].self_attn
    seen: dict = {}
    handles = [
        attn.q_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("q", out)),
        attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("k", out)),
        attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0])),
        attn.register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__("pe", kw["position_embeddings"]), with_kwargs=True
        ),
        attn.register_forward_hook(lambda m, a, out: seen.__setitem__("weights", out[1])),
    ]
    with torch.no_grad():
        d.model.target(ids)
    for h in handles:
        h.remove()
    B, n, dh = ids.shape[0], ids.shape[1], attn.head_dim
    q = seen["q"].view(B, n, -1, dh).transpose(1, 2)
    k = seen["k"].view(B, n, -1, dh).transpose(1, 2)
    cos, sin = seen["pe"]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    return {**seen, "scores": (q @ k.transpose(2, 3))[0], "cos": cos[0], "sin": sin[0], "z": seen["z"][0]}


@pytest.mark.parametrize("layer", [0, 1])
def test_terms_sum_to_the_models_scores(setup, layer):
    d, ids = setup
    ref = reference(d, ids, layer)["scores"]  # (H, T, T), before the 1/√d_head scale
    assert ref.abs().max() > 0.1  # O(1) scores, so the 1e-9 below is a real check
    terms = score_terms(d, ids, layer)
    assert torch.allclose(terms.scores(), ref, rtol=0, atol=1e-9)
    biased = d.model.components(terms.layout.q_path).bias is not None
    for t in range(T):
        for t_key in range(T):
            parts = score_decomposition(terms, t, t_key)
            assert ("bias·bias" in parts) == biased and "delta·delta" in parts
            total = sum(p.flatten(1).sum(1) if p.ndim > 1 else p for p in parts.values())
            assert torch.allclose(total, ref[:, t, t_key], rtol=0, atol=1e-9), (t, t_key)
            # DD is the comp·comp block; the delta terms are not negligible for a random decomposition.
            assert torch.equal(parts["comp·comp"], data_dependent_strength(terms, t, t_key))
    assert parts["comp·delta"].abs().max() > 1e-3 and parts["delta·comp"].abs().max() > 1e-3


def test_dd_equals_brute_force_with_hf_rotation(setup):
    d, ids = setup
    layer, t, t_key = 1, T - 1, 2
    terms = score_terms(d, ids, layer)
    ref = reference(d, ids, layer)
    lay = terms.layout
    _, xs = d.model.forward_with_inputs(ids)
    q, k = d.model.components(lay.q_path), d.model.components(lay.k_path)
    a_q, a_k = xs[lay.q_path][0] @ q.V.detach(), xs[lay.k_path][0] @ k.V.detach()
    dh, groups = lay.d_head, lay.n_heads // lay.n_kv
    dd = data_dependent_strength(terms, t, t_key)
    for h in range(lay.n_heads):
        for c, c_k in [(0, 0), (3, 5), (7, 1)]:
            u_q = q.U.detach()[c, h * dh : (h + 1) * dh].view(1, 1, 1, dh)
            kv = h // groups  # GQA: query head h reads kv head h // (H / H_kv)
            u_k = k.U.detach()[c_k, kv * dh : (kv + 1) * dh].view(1, 1, 1, dh)
            rq, _ = apply_rotary_pos_emb(u_q, u_q, ref["cos"][t : t + 1], ref["sin"][t : t + 1])
            _, rk = apply_rotary_pos_emb(u_k, u_k, ref["cos"][t_key : t_key + 1], ref["sin"][t_key : t_key + 1])
            expected = a_q[t, c] * a_k[t_key, c_k] * (rq * rk).sum()
            assert torch.isclose(dd[h, c, c_k], expected, rtol=1e-10, atol=1e-12)
            assert torch.isclose(data_dependent_strength(terms, t, t_key, head=h)[c, c_k], expected, rtol=1e-10)


def test_attention_and_rotation_match_the_model(setup):
    d, ids = setup
    ref = reference(d, ids, 1)
    terms = score_terms(d, ids, 1)
    # Eager attention runs its softmax in float32, hence 1e-6.
    assert torch.allclose(terms.attention(), ref["weights"][0], atol=1e-6)
    assert torch.equal(attention_pattern(d, ids, 1), ref["weights"])
    rope = rope_of(d)
    cos, sin = rope_cos_sin(rope, torch.arange(T), head_dim=terms.layout.d_head)
    assert torch.allclose(cos, ref["cos"], atol=1e-6) and torch.allclose(sin, ref["sin"], atol=1e-6)
    scale = d.model.target.model.rotary_emb.attention_scaling
    assert rope.scaling == pytest.approx(scale) and (scale != 1.0) == ("yarn" in str(d.model.target.config))


def test_apply_rope_matches_hf_in_full_and_partial_rotary():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64)  # (heads, positions, d_head)
    angles = torch.rand(5, 3, dtype=torch.float64) * 6
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # rotary_dim 6 < 8
    expected, _ = apply_rotary_pos_emb(x[..., :6], x[..., :6], cos[None], sin[None], unsqueeze_dim=0)
    out = apply_rope(x, cos, sin)
    assert torch.allclose(out[..., :6], expected, atol=1e-14) and torch.equal(out[..., 6:], x[..., 6:])
    cos8, sin8 = torch.cat((angles, angles[:, :1]) * 2, -1).cos(), torch.cat((angles, angles[:, :1]) * 2, -1).sin()
    full, _ = apply_rotary_pos_emb(x, x, cos8[None], sin8[None], unsqueeze_dim=0)
    assert torch.allclose(apply_rope(x, cos8, sin8), full, atol=1e-14)
    assert torch.equal(apply_rope(x, cos[:, :0], sin[:, :0]), x)  # no RoPE: R = I


def test_bad_inputs(setup):
    d, ids = setup
    with pytest.raises(VpdError, match="`layer` 2 is not a block"):
        score_terms(d, ids, 2)
    with pytest.raises(VpdError, match=r"`ids` must have shape"):
        score_terms(d, torch.zeros(2, T, dtype=torch.long), 0)
    terms = score_terms(d, ids, 0)
    with pytest.raises(VpdError, match=r"`t_key` must be a position in 0\.\.5"):
        data_dependent_strength(terms, 0, T)
    with pytest.raises(VpdError, match="`head`"):
        data_dependent_strength(terms, 0, 0, head=9)


@pytest.fixture(scope="module")
def graph(setup):
    d, ids = setup
    table = attribute_edges(d, ids, target_pos=T - 1)
    tokens = [f"tok{i}" for i in ids[0].tolist()]
    return table_to_networkx(
        table,
        prompt=" ".join(tokens),
        prompt_tokens=tokens,
        token_text={t: f"tok{t}" for t in table.logit_tokens},
        n_blocks=2,
    )


def _o_nodes(G):
    return [n for n, a in G.nodes(data=True) if a["kind"] == "comp" and a["sublayer"] == "o"]


def test_qk_pairs_for_every_o_node_are_json_and_ranked(setup, graph):
    d, ids = setup
    o_nodes = _o_nodes(graph)
    assert {graph.nodes[n]["block"] for n in o_nodes} == {0, 1}
    pairs = qk_pairs_for_o(d, ids, graph, top=3)
    assert json.loads(json.dumps(pairs, allow_nan=False)) == pairs
    assert [p["o_node"] for p in pairs] == [n for n in o_nodes for _ in range(3)]
    for n in o_nodes:
        mine = [p for p in pairs if p["o_node"] == n]
        assert [p["rank"] for p in mine] == [0, 1, 2]
        strengths = [abs(p["strength"]) for p in mine]
        assert strengths == sorted(strengths, reverse=True) and strengths[0] > 0
        for p in mine:
            assert p["strength"] == pytest.approx(p["head_share"] * p["attention"] * p["dd"], rel=1e-12)
            assert p["key_pos"] <= p["query_pos"] == graph.nodes[n]["pos"]
            assert p["q_in_graph"] == (p["q_node"] in graph) and p["k_in_graph"] == (p["k_node"] in graph)


def test_qk_pairs_top_pair_is_the_brute_force_maximum(setup, graph):
    d, ids = setup
    n = _o_nodes(graph)[-1]
    a = graph.nodes[n]
    t, c_o, layer = a["pos"], a["index"], a["block"]
    terms = score_terms(d, ids, layer)
    ref = reference(d, ids, layer)
    lay = terms.layout
    v_o = d.model.components(lay.o_path).V.detach()[:, c_o]
    dh = lay.d_head
    per_head = [abs(float(ref["z"][t, h * dh : (h + 1) * dh] @ v_o[h * dh : (h + 1) * dh])) for h in range(lay.n_heads)]
    best, where = 0.0, None
    for h in range(lay.n_heads):
        for s in range(t + 1):
            dd = data_dependent_strength(terms, t, s, head=h)
            w = per_head[h] / sum(per_head) * float(ref["weights"][0, h, t, s]) * dd
            i = int(w.abs().argmax())
            if abs(float(w.flatten()[i])) > abs(best):
                best, where = float(w.flatten()[i]), (h, s, *divmod(i, w.shape[1]))
    top = qk_pairs_for_o(d, ids, graph, top=1)
    top = next(p for p in top if p["o_node"] == n)
    h, s, c, c_k = where
    assert (top["head"], top["key_pos"], top["q_node"], top["k_node"]) == (
        h,
        s,
        f"comp/{lay.q_path}/{c}@{t}",
        f"comp/{lay.k_path}/{c_k}@{s}",
    )
    assert top["strength"] == pytest.approx(best, rel=1e-5)  # eager attention weights are float32-rounded


def test_add_qk_pairs_copies_and_the_panel_shows_escaped_pairs(setup, graph, tmp_path):
    d, ids = setup
    G = add_qk_pairs(graph, d, ids, top=2)
    assert graph.graph["qk_pairs"] == [] and len(G.graph["qk_pairs"]) == 2 * len(_o_nodes(graph))
    assert set(G.nodes) == set(graph.nodes)
    first = G.graph["qk_pairs"][0]
    first["k_label"] = NASTY
    page = render_html(G, tmp_path / "g.html").read_text()
    panel = page[page.index('<div id="vpd-panel">') :]
    assert NASTY not in page and "&lt;/script&gt;&lt;b&gt;&amp;" in panel
    assert f'<tbody data-o-node="{first["o_node"]}">' in panel
    second = G.graph["qk_pairs"][1]
    assert f"<td>{second['q_label']}</td>" in panel and f"<td>{second['k_label']}</td>" in panel
    assert panel.count("<tbody data-o-node=") == len(_o_nodes(graph))
    assert 'network.on("selectNode", function (params) { show(params.nodes); });' in page


def test_qk_pairs_bad_inputs(setup, graph):
    d, ids = setup
    with pytest.raises(VpdError, match="`top` must be a positive int"):
        qk_pairs_for_o(d, ids, graph, top=0)
    with pytest.raises(VpdError, match="outside the 2-token `ids`"):
        qk_pairs_for_o(d, ids[:, :2], graph)

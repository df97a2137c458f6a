"""Export (node-link, circuit-tracer JSON) and rendering (HTML, PNG) of a small hand-built graph."""

from __future__ import annotations

import copy
import html
import json
import math
import re
from html.parser import HTMLParser

import networkx as nx
import pytest

from attrgraph.explorer.payload import MIN_COLUMN, NODE_GAP, explorer_payload
from attrgraph.export import (
    from_node_link,
    load_graph_json,
    save_graph_json,
    to_circuit_tracer,
    to_node_link,
)
from attrgraph.prune import graph_influence
from attrgraph.render import render_html, render_png, render_svg
from decomposer.errors import ArtifactFormatError, VpdError
from tests.conftest import graph_comp, graph_node

NASTY = "</script><b>&"
Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
OUT = "model.layers.0.self_attn.o_proj"
UP = "model.layers.0.mlp.up_proj"
DOWN = "model.layers.0.mlp.down_proj"
REPORT = {"P(target) target": 0.8125, "P(target) CI": 0.7031, "P(target) stochastic": 0.6406, "P(target) adv": 0.3125}
TOKENS = ["<|endoftext|>", " a", NASTY, " b"]


def _node(kind: str, pos: int, row: int, label: str, **extra) -> dict:
    return graph_node(TOKENS, kind, pos, row, label, **extra)


def _comp(module: str, short: str, c: int, t: int, row: int, ci: float) -> tuple[str, dict]:
    sub = "mlp" if "mlp" in module else "attn"
    return graph_comp(TOKENS, module, short, c, t, row, ci, f"0.{sub}.{short}:{t}:{c}", activation=0.5 * c)


@pytest.fixture
def graph() -> nx.DiGraph:
    """One block (rows 1–4), four positions, logits on row 5; 13 nodes of every kind, 10 edges."""
    qk = {"o_node": f"comp/{OUT}/3@3", "q_node": f"comp/{Q}/5@3", "k_node": f"comp/{K}/7@2", "key_pos": 2}
    G = nx.DiGraph(
        prompt="".join(TOKENS),
        prompt_tokens=list(TOKENS),
        target_pos=3,
        target_token=" c",
        report=dict(REPORT),
        qk_pairs=[{**qk, "strength": 1.75}],
        settings={"ci_threshold": 0.1, "n_blocks": 1, "model": "tiny"},
    )
    for t, tok in enumerate(TOKENS):
        G.add_node(f"emb@{t}", **_node("emb", t, 0, tok if t == 2 else f"emb:{t}"))  # a token as a label
    comps = [(Q, "q", 5, 3, 1, 0.9), (K, "k", 7, 2, 1, 0.6), (Q, "q", 2, 3, 1, 0.3)]
    comps += [(OUT, "o", 3, 3, 2, 0.8), (UP, "up", 2, 2, 3, 0.5), (DOWN, "down", 11, 3, 4, 1.0)]
    G.add_nodes_from(_comp(*spec) for spec in comps)
    G.nodes[f"comp/{OUT}/3@3"]["top_tokens"] = ["Paris", "<b>"]
    delta = _node("delta", 3, 4, "0.mlp.down:3:delta", module=DOWN, block=0, sublayer="down", activation=0.2)
    G.add_node(f"delta/{DOWN}@3", **delta)
    for token_id, prob in ((42, 0.8125), (7, 0.125)):
        logit = _node("logit", 3, 5, f"logit:{token_id}@3", index=token_id, prob=prob, token_id=token_id)
        G.add_node(f"logit/{token_id}@3", **logit)
    edges = [
        ("emb@3", f"comp/{Q}/5@3", 0.5),
        ("emb@3", f"comp/{Q}/2@3", 0.1),
        ("emb@2", f"comp/{K}/7@2", 0.7),
        ("emb@2", f"comp/{UP}/2@2", 0.3),
        (f"comp/{Q}/5@3", f"comp/{OUT}/3@3", 0.9),
        (f"comp/{K}/7@2", f"comp/{OUT}/3@3", 0.6),  # the cross-position edge
        (f"comp/{OUT}/3@3", f"comp/{DOWN}/11@3", -0.4),
        (f"comp/{DOWN}/11@3", "logit/42@3", 1.5),
        (f"comp/{DOWN}/11@3", "logit/7@3", -0.4),
        (f"delta/{DOWN}@3", "logit/42@3", -0.2),
    ]
    for u, v, w in edges:
        G.add_edge(u, v, weight=w, cross_position=G.nodes[u]["pos"] != G.nodes[v]["pos"])
    return G


class _ScriptTags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.opened = self.closed = 0

    def handle_starttag(self, tag, attrs):
        self.opened += tag == "script"

    def handle_endtag(self, tag):
        self.closed += tag == "script"


def _snapshot(G: nx.DiGraph) -> tuple:
    return (list(G.nodes(data=True)), list(G.edges(data=True)), G.graph)


def _same(G: nx.DiGraph, H: nx.DiGraph) -> None:
    assert type(H) is nx.DiGraph
    assert list(H.nodes(data=True)) == list(G.nodes(data=True))
    assert list(H.edges(data=True)) == list(G.edges(data=True))
    assert H.graph == G.graph


def test_node_link_json_round_trip_is_exact(graph, tmp_path):
    data = to_node_link(graph)
    assert "edges" in data and "links" not in data
    _same(graph, from_node_link(json.loads(json.dumps(data))))
    data["graph"]["report"]["P(target) CI"] = 0.0  # the export shares no object with the graph
    assert graph.graph["report"] == REPORT

    path = save_graph_json(graph, tmp_path / "g" / "graph.nodelink.json")
    _same(graph, load_graph_json(path))
    assert json.loads(path.read_text())["format_version"] == 1


def test_node_link_rejects_wrong_inputs(graph, tmp_path):
    data = nx.node_link_data(graph, edges="links")
    with pytest.raises(VpdError, match="'links'"):
        from_node_link(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(to_node_link(graph)))
    with pytest.raises(ArtifactFormatError, match="save_graph_json"):
        load_graph_json(bad)


def test_circuit_tracer_json(graph):
    before = copy.deepcopy(_snapshot(graph))
    out = to_circuit_tracer(graph, slug="tiny-test", node_threshold=0.8)
    assert set(out) == {"metadata", "qParams", "nodes", "links"}
    meta = out["metadata"]
    assert {"slug", "scan", "prompt", "prompt_tokens", "node_threshold", "schema_version", "info"} <= set(meta)
    assert meta["transcoder_list"] == []
    assert meta["slug"] == "tiny-test" and meta["scan"] == "tiny" and meta["prompt_tokens"][2] == NASTY
    assert meta["info"]["report"] == REPORT and meta["info"]["settings"]["ci_threshold"] == 0.1
    assert set(out["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}

    nodes = {n["vpd_node_id"]: n for n in out["nodes"]}
    assert set(nodes) == set(graph.nodes) and len(out["nodes"]) == graph.number_of_nodes()
    assert len({n["node_id"] for n in out["nodes"]}) == len(out["nodes"])
    assert len(out["links"]) == graph.number_of_edges()
    kinds = {"comp": "vpd subcomponent", "delta": "vpd delta error", "emb": "embedding", "logit": "logit"}
    for vid, node in nodes.items():
        assert node["feature_type"] == kinds[graph.nodes[vid]["kind"]]
        assert node["ctx_idx"] == graph.nodes[vid]["pos"]
        if graph.nodes[vid]["kind"] != "logit":
            assert node["clerp"] == graph.nodes[vid]["label"]
    assert nodes["emb@1"]["layer"] == "E" and nodes["logit/42@3"]["layer"] == "5"
    assert [v for v, n in nodes.items() if n["is_target_logit"]] == ["logit/42@3"]
    assert nodes["logit/42@3"]["token_prob"] == 0.8125

    # Module order by row then name: k (C=8), q (C=6), o (C=4), up (C=3), down (C=12).
    info = meta["info"]
    assert info["module_order"] == [K, Q, OUT, UP, DOWN]
    assert info["module_sizes"] == {K: 8, Q: 6, OUT: 4, UP: 3, DOWN: 12}
    assert nodes[f"comp/{Q}/5@3"]["feature"] == 8 + 5 and nodes[f"comp/{DOWN}/11@3"]["feature"] == 8 + 6 + 4 + 3 + 11
    ids = {vid: n["node_id"] for vid, n in nodes.items()}
    link = {(lk["source"], lk["target"]): lk["weight"] for lk in out["links"]}
    assert link[(ids[f"delta/{DOWN}@3"], ids["logit/42@3"])] == -0.2
    json.dumps(out, allow_nan=False)
    assert _snapshot(graph) == before

    fixed = to_circuit_tracer(graph, slug="s", module_sizes={Q: 100, K: 100, OUT: 100, UP: 100, DOWN: 100})
    assert {n["vpd_node_id"]: n["feature"] for n in fixed["nodes"]}[f"comp/{K}/7@2"] == 107
    with pytest.raises(VpdError, match="module_sizes"):
        to_circuit_tracer(graph, slug="s", module_sizes={Q: 100})
    with pytest.raises(VpdError, match="node_threshold"):
        to_circuit_tracer(graph, slug="s", node_threshold=80)


# What circuit-tracer 0.5.0's file model (circuit_tracer.frontend.graph_models) requires, with types;
# benchmarks/peers/validate_export.py checks the same export against the model itself.
_CT_METADATA = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str}
_CT_NODE = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "jsNodeId": str}
_CT_NODE_OPTIONAL = {"token_prob": float, "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "clerp": str}


def test_circuit_tracer_json_has_the_file_models_fields(graph):
    out = json.loads(json.dumps(to_circuit_tracer(graph, slug="tiny-test")))
    for key, kind in _CT_METADATA.items():
        assert isinstance(out["metadata"][key], kind), key
    assert all(isinstance(t, str) for t in out["metadata"]["transcoder_list"] + out["metadata"]["prompt_tokens"])
    for node in out["nodes"]:
        for key, kind in {**_CT_NODE, **_CT_NODE_OPTIONAL}.items():
            assert type(node[key]) is kind, (node["node_id"], key)  # bool is no int here, nor int a float
        for key in ("influence", "activation"):
            assert node[key] is None or isinstance(node[key], float), (node["node_id"], key)
    assert all(set(link) == {"source", "target", "weight"} for link in out["links"])


def test_circuit_tracer_logit_clerp_and_influence_read_as_the_frontend_reads_them(graph):
    graph.nodes["logit/7@3"]["logit_token"] = ' "x'  # a quote inside the token
    for _, attrs in graph.nodes(data=True):
        attrs.pop("influence", None)
    graph.nodes[f"comp/{DOWN}/11@3"]["influence"] = 0.5
    graph.nodes[f"comp/{OUT}/3@3"]["influence"] = 0.3
    graph.nodes[f"comp/{K}/7@2"]["influence"] = 0.2
    out = to_circuit_tracer(graph, slug="tiny-test")
    nodes = {n["vpd_node_id"]: n for n in out["nodes"]}
    # util-cg.js: logitPct = +clerp.split('(p=')[1].split(')')[0]; the target's text is the graph's target token.
    for vid, token, prob in (("logit/42@3", " c", 0.8125), ("logit/7@3", ' "x', 0.125)):
        clerp = nodes[vid]["clerp"]
        assert clerp == f'Output "{token}" (p={prob:.3f})'
        assert float(clerp.split("(p=")[1].split(")")[0]) == pytest.approx(prob, abs=5e-4)
    # influence is the cumulative share in descending order, as in circuit-tracer's files.
    assert nodes[f"comp/{DOWN}/11@3"]["influence"] == pytest.approx(0.5 / 1.0)
    assert nodes[f"comp/{OUT}/3@3"]["influence"] == pytest.approx(0.8 / 1.0)
    assert nodes[f"comp/{K}/7@2"]["influence"] == pytest.approx(1.0)
    assert nodes[f"comp/{K}/7@2"]["vpd_influence"] == 0.2
    assert nodes["emb@0"]["influence"] is None


def _page_data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="vpd-data">(.*?)</script>', page, re.S).group(1))


def test_render_html_is_offline_escaped_and_complete(graph, tmp_path):
    before = copy.deepcopy(_snapshot(graph))
    path = render_html(graph, tmp_path / "graph.html", title=f"Graph {NASTY}")
    page = path.read_text(encoding="utf-8")

    # Nothing to fetch: no remote src/href, and a policy that forbids loading anything at all.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page and page.count("<script") == page.count("</script>")
    assert NASTY not in page and "<b>&" not in page
    # Every '</script>' in the file closes a real script element (the browser's tokenizer agrees).
    tags = _ScriptTags()
    tags.feed(page)
    tags.close()
    assert tags.opened == tags.closed == page.count("</script>") >= 3
    assert "<title>Graph &lt;/script&gt;&lt;b&gt;&amp;</title>" in page
    assert "\\u003c/script\\u003e\\u003cb\\u003e\\u0026" in page  # the token inside the embedded JSON

    data = _page_data(page)
    assert data["tokens"] == TOKENS  # the escapes decode back to the exact tokens
    assert data["rows"] == ["Emb", "L0 attn q", "L0 attn k", "L0 attn o", "L0 mlp up", "L0 mlp down", "Logits"]
    nodes = {n["id"]: n for n in data["nodes"]}
    assert set(nodes) == set(graph.nodes)
    assert nodes[f"delta/{DOWN}@3"]["row"] == nodes[f"comp/{DOWN}/11@3"]["row"] == 5  # a delta sits in its matrix's row
    y = {k: n["y"] for k, n in nodes.items()}
    assert y["emb@0"] > y[f"comp/{Q}/5@3"] > y[f"comp/{K}/7@2"] > y["logit/42@3"]  # screen y grows down
    x = {k: n["x"] for k, n in nodes.items()}
    assert x[f"comp/{Q}/5@3"] < x[f"comp/{Q}/2@3"]  # same cell: more influence first
    assert x["logit/42@3"] < x["logit/7@3"]  # logits by probability
    assert x["emb@0"] < x["emb@1"] < x["emb@2"] < x["emb@3"]
    assert nodes[f"comp/{OUT}/3@3"]["key"] == "0.attn.o:3" and nodes[f"comp/{OUT}/3@3"]["inf"] == pytest.approx(0.08)
    assert len(data["edges"]) == graph.number_of_edges()
    q, k = f"comp/{Q}/5@3", f"comp/{K}/7@2"
    assert data["qk"] == [
        {
            "o": _index(data, f"comp/{OUT}/3@3"),
            "q": _index(data, q),
            "k": _index(data, k),
            "q_label": q,
            "k_label": k,
            "key_pos": 2,
            "strength": 1.75,
        }
    ]

    panel = page[page.index('<div id="vpd-panel">') :]
    for value in REPORT.values():
        assert f"<td>{value:.3g}</td>" in panel
    assert "<td>1.75</td>" in panel and 'id="vpd-node-threshold"' in panel
    assert _snapshot(graph) == before


def _index(data: dict, node: str) -> int:
    return next(i for i, n in enumerate(data["nodes"]) if n["id"] == node)


def test_render_html_refuses_large_graphs(graph, tmp_path):
    with pytest.raises(VpdError, match=r"Graph has 13 nodes, above `max_nodes`=5 .*prune_graph"):
        render_html(graph, tmp_path / "g.html", max_nodes=5)
    with pytest.raises(VpdError, match="`max_edges`"):
        render_html(graph, tmp_path / "g.html", max_edges=3)
    with pytest.raises(VpdError, match="`max_nodes`"):
        render_png(graph, tmp_path / "g.png", max_nodes=5)
    assert not list(tmp_path.iterdir())


def test_explorer_columns_fit_their_busiest_cell(graph):
    narrow = explorer_payload(graph)
    assert narrow["columns"] == [[i * MIN_COLUMN, MIN_COLUMN] for i in range(4)] and narrow["n_cols"] == 4
    for c in range(20, 40):  # 20 more up nodes in one cell
        node, attrs = _comp(UP, "up", c, 2, 3, ci=0.5)
        graph.add_node(node, **{**attrs, "influence": 0.001 * c})
    wide = explorer_payload(graph)
    busy = 21 * NODE_GAP + NODE_GAP
    assert wide["columns"] == [
        [0, MIN_COLUMN],
        [MIN_COLUMN, MIN_COLUMN],
        [2 * MIN_COLUMN, busy],
        [2 * MIN_COLUMN + busy, MIN_COLUMN],
    ]
    assert wide["width"] == 3 * MIN_COLUMN + busy
    cell = sorted((n for n in wide["nodes"] if n["attrs"]["sublayer"] == "up"), key=lambda n: n["x"])
    assert [n["inf"] for n in cell] == sorted((n["inf"] for n in cell), reverse=True)
    assert 2 * MIN_COLUMN < cell[0]["x"] and cell[-1]["x"] < 2 * MIN_COLUMN + busy  # inside column 2


def test_graph_influence_sums_every_path_to_the_logits(graph):
    """Without node influence the explorer computes w^T((I - A)^-1 - I), A the row-normalised |weights|."""
    import numpy as np

    for _, attrs in graph.nodes(data=True):
        attrs.pop("influence", None)
    got = graph_influence(graph)
    order = list(graph.nodes)
    A = np.abs(nx.to_numpy_array(graph, nodelist=order, weight="weight")).T  # A[target, source]
    A = A / np.where(A.sum(1, keepdims=True) > 0, A.sum(1, keepdims=True), 1.0)
    w = np.array([graph.nodes[n].get("prob", 0.0) if graph.nodes[n]["kind"] == "logit" else 0.0 for n in order])
    w = w / w.sum()
    want = w @ (np.linalg.inv(np.eye(len(order)) - A) - np.eye(len(order)))
    assert [got[n] for n in order] == pytest.approx(want.tolist())
    assert got[f"comp/{DOWN}/11@3"] > got["emb@1"] == 0.0  # emb@1 reaches no logit
    data = explorer_payload(graph)
    assert {n["id"]: n["inf"] for n in data["nodes"]} == pytest.approx(got)


def test_explorer_cards_come_from_the_harvest(graph, tmp_path):
    summary = {
        "density": 0.0123,
        "input_precision": [{"id": 5, "token": " Paris", "precision": 0.9}, {"id": 6, "token": NASTY}],
        "output": [{"id": 7, "token": " France"}],
        "top_examples": [{"tokens": [1, 5, 2], "center": 1, "ci": 0.97, "text": [" in", " Paris", NASTY]}],
        "label": "fires on ' Paris' → writes ' France'",
    }
    path = render_html(graph, tmp_path / "g.html", harvest={"0.attn.o:3": summary, "9.mlp.up:1": summary})
    page = path.read_text(encoding="utf-8")
    assert NASTY not in page
    cards = _page_data(page)["cards"]
    assert set(cards) == {"0.attn.o:3"}  # only subcomponents in the graph
    card, table = cards["0.attn.o:3"], _page_data(page)["card_tokens"]
    assert card["inputs"] == [[" Paris", 0.9, None], [NASTY, None, None]] and card["density"] == 0.0123
    assert card["outputs"] == [[" France", None]] and card["label"] == "fires on ' Paris' → writes ' France'"
    # Contexts: token strings once in a table, CI in percent (a summary carries it at the firing token only).
    [context] = card["contexts"]
    assert [table[i] for i in context["t"]] == [" in", " Paris", NASTY]
    assert context["c"] == 1 and context["ci"] == [0, 97, 0]


def test_render_png_and_svg(graph, tmp_path):
    before = copy.deepcopy(_snapshot(graph))
    data = render_png(graph, tmp_path / "graph.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    svg = render_svg(graph, tmp_path / "graph.svg").read_text(encoding="utf-8")
    texts = [html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", svg)]
    for row in ("Emb", "L0 attn q", "L0 mlp down", "Logits"):  # named rows
        assert row in texts
    # Tokens with visible whitespace and their positions; columns 0 and 1 hold only an embedding and
    # shrink to slivers, so every token label stands upright on one line.
    assert "␣a  1" in texts and "␣b  3" in texts
    assert "+ edge" in texts and "down" in texts  # the legend
    assert NASTY.replace(" ", "␣") in "".join(texts)
    assert render_svg(graph, tmp_path / "again.svg").read_bytes() == (tmp_path / "graph.svg").read_bytes()
    assert _snapshot(graph) == before


def test_static_figure_labels_never_overlap():
    """A crowded cell: 30 labelled nodes at one position; the figure keeps some labels and none overlap."""
    from attrgraph.figure import _figure

    G = nx.DiGraph(prompt="a b", prompt_tokens=["a", " b"], target_pos=1, target_token=" c")
    G.add_node("emb@1", **_node("emb", 1, 0, "emb:1"))
    for c in range(30):
        node, attrs = _comp(DOWN, "down", c, 1, 4, ci=1.0)
        G.add_node(node, **{**attrs, "label": f"0.mlp.down:1:{c} writes token number {c}", "influence": 1.0 - c / 30})
        G.add_edge("emb@1", node, weight=1.0, cross_position=False)
    fig = _figure(G, max_labels=30)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert 3 <= len(boxes) < 30
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert ax.texts[0].get_text() == "writes token number 0"  # the most influential first, key prefix dropped


def test_explorer_first_view_draws_at_most_the_strongest_edges(graph, monkeypatch):
    import attrgraph.explorer.payload as payload

    assert explorer_payload(graph)["edge_threshold"] == 1.0
    monkeypatch.setattr(payload, "MAX_DRAWN_EDGES", 3)
    strengths = sorted((abs(w) for _, _, w in graph.edges(data="weight")), reverse=True)
    share = sum(strengths[:3]) / sum(strengths)  # 1.5 + 0.9 + 0.7 of 5.6
    assert explorer_payload(graph)["edge_threshold"] == math.floor(100 * share) / 100 == 0.55


def test_explorer_cards_from_a_harvest_folder(graph, tmp_path):
    """A folder's harvest.json: example token ids decode through its vocabulary."""
    summary = {
        "density": 0.5,
        "input_pmi": [{"id": 2, "token": "b"}],
        "top_examples": [{"tokens": [0, 2], "center": 1}],
    }
    meta = {"format": "harvest", "format_version": 1, "vocab": ["a", NASTY, "b"], "components": {"0.attn.o:3": summary}}
    (tmp_path / "harvest.json").write_text(json.dumps(meta))
    data = explorer_payload(graph, harvest=tmp_path)
    card = data["cards"]["0.attn.o:3"]
    assert card["inputs"] == [["b", None, None]]
    assert [data["card_tokens"][i] for i in card["contexts"][0]["t"]] == ["a", "b"] and card["contexts"][0]["c"] == 1
    with pytest.raises(VpdError, match=r"holds no examples/ folder and no harvest.json; run `vpd harvest"):
        render_html(graph, tmp_path / "g.html", harvest=tmp_path / "nothing")


def _deep_graph(n_blocks: int, matrices: tuple[str, ...]) -> nx.DiGraph:
    """One node per matrix of every block at position 1, chained upwards, over two positions."""
    G = nx.DiGraph(prompt="a b", prompt_tokens=["a", " b"], target_pos=1, target_token=" c")
    G.add_node("emb@1", **_node("emb", 1, 0, "emb:1"), influence=1.0)
    below = "emb@1"
    for b in range(n_blocks):
        for short in matrices:
            part, proj = ("mlp", "mlp") if short in ("gate", "up", "gate_up", "down") else ("attn", "self_attn")
            module = f"model.layers.{b}.{proj}.{short}_proj"
            node = f"comp/{module}/0@1"
            attrs = _node("comp", 1, 0, f"{b}.{part}.{short}:0", module=module, block=b, sublayer=short, index=0)
            G.add_node(node, **attrs, influence=0.5)
            G.add_edge(below, node, weight=1.0, cross_position=False)
            below = node
    return G


def test_deep_models_open_with_one_row_per_block():
    from attrgraph.explorer.payload import MAX_MATRIX_ROWS

    matrices = ("q", "k", "v", "o", "gate", "up", "down")
    deep = explorer_payload(_deep_graph(30, matrices))
    assert len(deep["layouts"]["matrix"]["rows"]) == 30 * 7 + 1 > MAX_MATRIX_ROWS
    assert deep["layout"] == "block" and deep["rows"] == ["Emb", *(f"L{b}" for b in range(30))]
    # Inside a block's cell the matrices sit left to right in the order the residual stream meets them.
    xs = {n["attrs"]["sublayer"]: n["x"] for n in deep["nodes"] if n["attrs"].get("block") == 7}
    assert sorted(xs, key=xs.get) == list(matrices)
    assert all(n["row"] == deep["layouts"]["block"]["at"][i][2] for i, n in enumerate(deep["nodes"]))
    shallow = explorer_payload(_deep_graph(4, matrices))
    assert shallow["layout"] == "matrix" and shallow["rows"][:3] == ["Emb", "L0 attn q", "L0 attn k"]
    # A fused gate_up matrix (Phi-3) sits between up and down, not after every other row.
    fused = explorer_payload(_deep_graph(2, ("q", "o", "gate_up", "down")))
    assert fused["rows"] == ["Emb", "L0 attn q", "L0 attn o", "L0 mlp gate_up", "L0 mlp down", *fused["rows"][5:]]
    assert fused["rows"][5:] == ["L1 attn q", "L1 attn o", "L1 mlp gate_up", "L1 mlp down"]

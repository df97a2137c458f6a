"""Export (node-link, circuit-tracer JSON) and rendering (HTML, PNG) of a small hand-built graph."""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser

import networkx as nx
import pytest

from attrgraph.export import (
    from_node_link,
    load_graph_json,
    save_graph_json,
    to_circuit_tracer,
    to_node_link,
)
from attrgraph.render import render_html, render_png
from decomposer.errors import ArtifactFormatError, VpdError

NASTY = "</script><b>&"
Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
OUT = "model.layers.0.self_attn.o_proj"
UP = "model.layers.0.mlp.up_proj"
DOWN = "model.layers.0.mlp.down_proj"
REPORT = {"P(target) target": 0.8125, "P(target) CI": 0.7031, "P(target) stochastic": 0.6406, "P(target) adv": 0.3125}
TOKENS = ["<|endoftext|>", " a", NASTY, " b"]


def _node(kind: str, pos: int, row: int, label: str, **extra) -> dict:
    base = {"module": None, "block": None, "sublayer": None, "index": None, "ci": 1.0, "activation": 1.0}
    return {**base, "kind": kind, "pos": pos, "row": row, "label": label, "token": TOKENS[pos], **extra}


def _comp(module: str, short: str, c: int, t: int, row: int, ci: float) -> tuple[str, dict]:
    sub = "mlp" if "mlp" in module else "attn"
    attrs = _node("comp", t, row, f"0.{sub}.{short}:{t}:{c}", module=module, block=0, sublayer=short, index=c)
    return f"comp/{module}/{c}@{t}", {**attrs, "ci": ci, "activation": 0.5 * c, "influence": 0.1 * ci}


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


def test_render_html_is_offline_escaped_and_complete(graph, tmp_path):
    before = copy.deepcopy(_snapshot(graph))
    path = render_html(graph, tmp_path / "graph.html", title=f"Graph {NASTY}")
    page = path.read_text(encoding="utf-8")

    for node in graph.nodes:
        assert json.dumps(node) in page, node
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)

    assert NASTY not in page and "<b>&" not in page
    # Every '</script>' in the file closes a real script element (the browser's tokenizer agrees).
    tags = _ScriptTags()
    tags.feed(page)
    tags.close()
    assert tags.opened == tags.closed == page.count("</script>") >= 3
    assert "&lt;/script&gt;&lt;b&gt;&amp;" in page  # panel, page title
    assert "&lt;|endoftext|&gt;" in page
    assert "\\u0026lt;/script\\u0026gt;" in page  # labels and tooltips inside the node JSON
    assert "<title>Graph &lt;/script&gt;&lt;b&gt;&amp;</title>" in page

    options = json.loads(re.search(r"var options = (\{.*?\});\n", page, re.S).group(1))
    assert options["physics"]["enabled"] is False and options["edges"]["smooth"] is False
    nodes = json.loads(re.search(r"nodes = new vis\.DataSet\((\[.*?\])\);\n", page, re.S).group(1))
    assert all("x" in n and "y" in n for n in nodes) and len(nodes) == graph.number_of_nodes()
    y = {n["id"]: n["y"] for n in nodes}
    assert y["emb@0"] > y[f"comp/{Q}/5@3"] > y["logit/42@3"]  # embeddings at the bottom (screen y grows down)
    x = {n["id"]: n["x"] for n in nodes}
    assert x[f"comp/{Q}/5@3"] < x[f"comp/{Q}/2@3"]  # same cell: higher CI first
    assert x["logit/42@3"] < x["logit/7@3"]  # logits by probability

    panel = page[page.index('<div id="vpd-panel">') :]
    for name, value in REPORT.items():
        assert f"<td>{name}</td><td>{value}</td>" in panel
    assert "<td>1.75</td>" in panel and "selectNode" in page
    assert _snapshot(graph) == before


def test_render_html_refuses_large_graphs(graph, tmp_path):
    with pytest.raises(VpdError, match=r"Graph has 13 nodes, above `max_nodes`=5 .*prune_graph"):
        render_html(graph, tmp_path / "g.html", max_nodes=5)
    with pytest.raises(VpdError, match="`max_edges`"):
        render_html(graph, tmp_path / "g.html", max_edges=3)
    with pytest.raises(VpdError, match="`max_nodes`"):
        render_png(graph, tmp_path / "g.png", max_nodes=5)
    assert not list(tmp_path.iterdir())


def test_render_png(graph, tmp_path):
    before = copy.deepcopy(_snapshot(graph))
    path = render_png(graph, tmp_path / "graph.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert _snapshot(graph) == before

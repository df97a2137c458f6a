"""`attrgraph.pyvis_view.to_pyvis`: the explorer's layout and colours as a pyvis network."""

from __future__ import annotations

import re

import networkx as nx
import pytest

from attrgraph.explorer.page import _LEGEND, _NEGATIVE_EDGE, _POSITIVE_EDGE
from attrgraph.explorer.payload import explorer_payload
from attrgraph.pyvis_view import to_pyvis
from tests.conftest import graph_comp, graph_node

HOSTILE = '<img src=x onerror="alert(1)"></script>'
NASTY = "</script><b>&"
TOKENS = ["<|endoftext|>", NASTY, " b"]
Q = "model.layers.0.self_attn.q_proj"
OUT = "model.layers.0.self_attn.o_proj"
DOWN = "model.layers.0.mlp.down_proj"


def _node(kind: str, pos: int, row: int, label: str, **extra) -> dict:
    return graph_node(TOKENS, kind, pos, row, label, **extra)


def _comp(module: str, short: str, c: int, t: int, row: int, ci: float) -> tuple[str, dict]:
    sub = "mlp" if "mlp" in module else "attn"
    return graph_comp(TOKENS, module, short, c, t, row, ci, f"0.{sub}.{short}:{c}@{t}")


@pytest.fixture
def graph() -> nx.DiGraph:
    """One block, three positions: every node kind, positive and negative edges, a hostile prompt token."""
    G = nx.DiGraph(prompt="".join(TOKENS), prompt_tokens=list(TOKENS), target_pos=2, target_token=" c")
    for t, tok in enumerate(TOKENS):
        G.add_node(f"emb@{t}", **_node("emb", t, 0, tok))
    G.add_nodes_from(_comp(*spec) for spec in [(Q, "q", 5, 2, 1, 0.9), (OUT, "o", 3, 2, 2, 0.8)])
    G.add_nodes_from([_comp(DOWN, "down", 11, 2, 3, 1.0)])
    G.add_node(f"delta/{DOWN}@2", **_node("delta", 2, 3, "0.mlp.down:delta", module=DOWN, sublayer="down"))
    for token_id in (42, 7):
        G.add_node(f"logit/{token_id}@2", **_node("logit", 2, 4, f"logit:{token_id}", index=token_id))
    edges = [
        ("emb@1", f"comp/{Q}/5@2", 0.5),
        ("emb@2", f"comp/{Q}/5@2", 0.3),
        (f"comp/{Q}/5@2", f"comp/{OUT}/3@2", 0.9),
        (f"comp/{OUT}/3@2", f"comp/{DOWN}/11@2", -0.4),
        (f"comp/{DOWN}/11@2", "logit/42@2", 1.5),
        (f"comp/{DOWN}/11@2", "logit/7@2", -0.4),
        (f"delta/{DOWN}@2", "logit/42@2", -0.2),
    ]
    for u, v, w in edges:
        G.add_edge(u, v, weight=w, cross_position=G.nodes[u]["pos"] != G.nodes[v]["pos"])
    return G


def _by_id(net) -> dict:
    return {n["id"]: n for n in net.nodes}


def test_nodes_sit_where_the_explorer_puts_them_in_its_colours(graph):
    net = to_pyvis(graph)
    nodes = _by_id(net)
    assert len(net.nodes) == graph.number_of_nodes() and len(net.edges) == graph.number_of_edges()
    for node in explorer_payload(graph)["nodes"]:
        assert (nodes[node["id"]]["x"], nodes[node["id"]]["y"]) == (node["x"], node["y"])
        assert nodes[node["id"]]["physics"] is False and nodes[node["id"]]["fixed"] is True
    colors = dict(_LEGEND)
    assert nodes[f"comp/{Q}/5@2"]["color"] == colors["q"]
    assert nodes[f"comp/{OUT}/3@2"]["color"] == colors["o"]
    assert nodes[f"comp/{DOWN}/11@2"]["color"] == colors["down"]
    assert nodes["emb@0"]["color"] == colors["emb"]
    assert nodes["logit/42@2"]["color"] == colors["logit"]
    assert nodes[f"delta/{DOWN}@2"]["color"] == colors["delta"]
    assert net.options.physics.enabled is False


def test_edges_are_coloured_by_sign_and_widened_by_strength(graph):
    edges = {(e["from"], e["to"]): e for e in to_pyvis(graph).edges}
    positive = edges[(f"comp/{DOWN}/11@2", "logit/42@2")]  # the strongest edge, +1.5
    negative = edges[(f"comp/{OUT}/3@2", f"comp/{DOWN}/11@2")]  # -0.4
    assert positive["color"] == _POSITIVE_EDGE and negative["color"] == _NEGATIVE_EDGE
    assert positive["width"] > negative["width"] > 0
    assert negative["width"] == edges[(f"comp/{DOWN}/11@2", "logit/7@2")]["width"]  # same |weight|


def test_titles_are_escaped_plain_text(graph):
    graph.nodes[f"comp/{Q}/5@2"]["label"] = HOSTILE
    net = to_pyvis(graph)
    title = _by_id(net)[f"comp/{Q}/5@2"]["title"]
    assert title.splitlines()[0] == '&lt;img src=x onerror="alert(1)"&gt;&lt;/script&gt;'
    assert "key: 0.attn.q:5" in title and "position: 2" in title and "CI: 0.9" in title and "influence:" in title
    assert "<" not in title and "<" not in _by_id(net)["emb@1"]["title"]  # the NASTY token, escaped too
    page = net.generate_html()
    assert HOSTILE not in page and NASTY not in page  # inside the page's JSON every < is \u003c


def test_the_page_carries_vis_network_inline(graph):
    page = to_pyvis(graph).generate_html()
    sources = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", page)
    # pyvis 0.3.2's template always links Bootstrap from jsdelivr; vis-network itself is inlined.
    assert all("bootstrap" in s for s in sources if "://" in s), sources
    assert not any("vis-network" in s or "cdnjs" in s for s in sources), sources
    assert "vis-network" in page and len(page) > 100_000

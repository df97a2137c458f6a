"""A pruned attribution graph as a `pyvis.network.Network`, laid out and coloured as the explorer draws it.

Why it exists: the explorer (`attrgraph.render.render_html`) is one fixed, offline page. A notebook user who
wants to restyle a graph with pyvis's own options (node shapes and sizes, edge smoothing, physics, the
configuration panel from `net.show_buttons()`, `net.show("graph.html")` or an inline notebook view) starts from
`to_pyvis(G)` instead of rebuilding the layout by hand.

What it keeps from the explorer: node positions (x, y of `attrgraph.explorer.payload.explorer_payload`, its
first layout), fixed, with physics off; node colours (the explorer's legend, `attrgraph.explorer.page._LEGEND`,
by matrix for subcomponents and by kind otherwise); edges blue when positive and orange when negative, their
width growing with |weight|. Each node's hover title is plain text (label, key, position, CI, influence),
HTML-escaped because pyvis's tooltip-link mode shows titles with `innerHTML`.

The network is created with `cdn_resources="in_line"`, so `net.generate_html()` carries vis-network itself;
pyvis 0.3.2's page template still links Bootstrap's CSS and JS from cdn.jsdelivr.net whatever the setting,
which the graph does not need to draw. The explorer page, not this view, is the offline artifact.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

import networkx as nx

from attrgraph.explorer.page import _LEGEND, _NEGATIVE_EDGE, _POSITIVE_EDGE
from attrgraph.explorer.payload import explorer_payload

if TYPE_CHECKING:
    from pyvis.network import Network

COLORS = dict(_LEGEND)
FALLBACK_COLOR = "#374151"  # the explorer's colour for a matrix or kind outside its legend (e.g. fused qkv)
MIN_WIDTH, MAX_WIDTH = 0.5, 6.0


def node_color(node: dict[str, Any]) -> str:
    """The explorer's colour of one payload node: by matrix (`sub`) for a subcomponent, else by kind."""
    name = node.get("sub") if node.get("kind") == "comp" else node.get("kind")
    return COLORS.get(str(name), FALLBACK_COLOR)


def edge_color(weight: float) -> str:
    """Blue for a positive (or zero) edge, orange for a negative one."""
    return _NEGATIVE_EDGE if weight < 0 else _POSITIVE_EDGE


def _number(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4g}"


def node_title(node: dict[str, Any]) -> str:
    """The hover text of one payload node: label, key (or node id), position and token, CI and influence."""
    attrs = node.get("attrs") or {}
    token = attrs.get("token")
    lines = [
        str(attrs.get("label") or node["id"]),
        f"key: {node.get('key') or node['id']}",
        f"position: {attrs.get('pos')}" + ("" if token is None else f" ({token!r})"),
        f"CI: {_number(attrs.get('ci'))}",
        f"influence: {_number(node.get('inf'))}",
    ]
    return html.escape("\n".join(lines), quote=False)


def to_pyvis(G: nx.DiGraph, *, height: str = "800px", width: str = "100%", **network_kwargs: Any) -> Network:
    """A `pyvis.network.Network` of a pruned graph, at the explorer's positions and in its colours.

    Args:
        G: A pruned attribution graph (see `attrgraph.export`); it is not modified.
        height, width: The canvas size, as pyvis takes it.
        **network_kwargs: Passed on to `pyvis.network.Network` (e.g. `notebook=True`,
            `cdn_resources="remote"`); `directed` is always True.

    Raises:
        VpdError: If a node lacks `kind` or `pos`, or the graph has a cycle (as `explorer_payload`).
    """
    from pyvis.network import Network

    payload = explorer_payload(G)
    network_kwargs.setdefault("cdn_resources", "in_line")
    net = Network(height=height, width=width, directed=True, **network_kwargs)
    for node in payload["nodes"]:
        attrs = node.get("attrs") or {}
        net.add_node(
            node["id"],
            label=str(attrs.get("label") or node["id"]),
            title=node_title(node),
            color=node_color(node),
            x=float(node["x"]),
            y=float(node["y"]),
            physics=False,
            fixed=True,
        )
    ids = [node["id"] for node in payload["nodes"]]
    largest = max((abs(w) for _, _, w, _ in payload["edges"] if math.isfinite(w)), default=0.0)
    for u, v, w, _cross in payload["edges"]:
        share = abs(w) / largest if largest > 0 and math.isfinite(w) else 0.0
        net.add_edge(
            ids[u],
            ids[v],
            color=edge_color(w),
            width=MIN_WIDTH + (MAX_WIDTH - MIN_WIDTH) * share,
            title=f"{w:+.4g}",
        )
    net.toggle_physics(False)
    return net

"""`render_html`: the explorer as one self-contained HTML file (vis-network, script, style and data inlined).

The graph travels as JSON inside `<script type="application/json">` with `<`, `>` and `&` written
as \\u escapes, so no prompt token can end the element; the script reads it with `JSON.parse` and
puts text on the page only through `textContent` and canvas text. A Content-Security-Policy of
`default-src 'none'` keeps the page from loading anything, even if some text slipped through.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import defaultdict
from importlib.resources import files
from pathlib import Path
from typing import Any

import networkx as nx

from attrgraph.explorer.payload import explorer_payload
from decomposer.errors import VpdError
from decomposer.io import atomic_write_text

_ASSETS = files("attrgraph.explorer") / "assets"
_TEMPLATE_FIELD = re.compile(r"\{(\w+)\}")
_LEGEND = (
    ("q", "#4f46e5"),
    ("k", "#0891b2"),
    ("v", "#9333ea"),
    ("o", "#15803d"),
    ("gate", "#a16207"),
    ("up", "#ea580c"),
    ("down", "#be185d"),
    ("emb", "#6b7280"),
    ("logit", "#111827"),
    ("delta", "#9ca3af"),
)
# Edge colours by the sign of the weight (the script's POS and NEG are the same RGB).
_POSITIVE_EDGE = "#2563eb"
_NEGATIVE_EDGE = "#ea580c"


_URL_SCHEME = re.compile(r"(https?)://", re.I)


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


def _script(name: str) -> str:
    """A script asset with `http://` written `http:\\/\\/`: the same string in JS, and a comment
    (vis-network's licence header) reads the same, so the page holds no URL-like text."""
    return _URL_SCHEME.sub(r"\1:\\/\\/", _asset(name))


def _esc(value: Any) -> str:
    """HTML-escape any value; '://' is broken up too, so no text on the page reads as a URL."""
    return html.escape(str(value)).replace("://", ":&#47;&#47;")


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if math.isfinite(x) else str(x)
    return str(x)


def script_json(data: Any) -> str:
    """JSON that is safe inside a `<script>` element: no `<`, `>`, `&` or line separators appear raw."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text.replace("://", ":\\/\\/")  # '\/' is '/' in a JSON string, the only place '://' can be


def check_limit(n: int, limit: int, what: str, arg: str, target: str) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise VpdError(f"`{arg}` must be a positive int; got {limit!r}.")
    if n > limit:
        raise VpdError(
            f"Graph has {n:,} {what}, above `{arg}`={limit:,} for {target} rendering. Prune first with "
            f"`prune_graph(graph, node_threshold=0.8)` or raise `{arg}`."
        )


# (header, keys tried in order): a pair shows its short labels where present, else its node ids.
_QK_COLUMNS = (
    ("head", ("head",)),
    ("q", ("q_label", "q_node")),
    ("k", ("k_label", "k_node")),
    ("key_pos", ("key_pos",)),
    ("DD", ("dd",)),
    ("attention", ("attention",)),
    ("strength", ("strength",)),
)

# When an o node with q/k pairs is selected, the table shows only its group; deselecting shows all.
_QK_JS = """<script>
window.addEventListener("load", function () {
  if (typeof network === "undefined") { return; }
  var groups = Array.prototype.slice.call(document.querySelectorAll("#vpd-qk tbody[data-o-node]"));
  function show(ids) {
    var hit = groups.some(function (g) { return ids.indexOf(g.getAttribute("data-o-node")) >= 0; });
    groups.forEach(function (g) {
      var mine = ids.indexOf(g.getAttribute("data-o-node")) >= 0;
      g.style.display = !hit || mine ? "" : "none";
      g.style.background = hit && mine ? "#fff6d5" : "";
    });
  }
  network.on("selectNode", function (params) { show(params.nodes); });
  network.on("deselectNode", function () { show([]); });
});
</script>"""


def _qk_table(G: nx.DiGraph) -> tuple[str, str]:
    """The q/k pairs as one escaped table body per o node, and the script that filters it."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for pair in G.graph.get("qk_pairs", []) or []:
        groups[str(pair.get("o_node", ""))].append(pair)
    if not groups:  # `qk_note` says why a decomposition has no q/k pairs (attrgraph.attention.qk_unavailable)
        return f"<p>{_esc(G.graph.get('qk_note') or 'none')}</p>", ""
    header = "".join(f"<th>{name}</th>" for name, _ in _QK_COLUMNS)
    bodies = []
    for o_node, pairs in groups.items():
        o_label = pairs[0].get("o_label") or (G.nodes[o_node].get("label") if o_node in G else None) or o_node
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{_esc(_fmt(next((p[k] for k in keys if p.get(k) is not None), '')))}</td>"
                for _, keys in _QK_COLUMNS
            )
            + "</tr>"
            for p in pairs
        )
        bodies.append(
            f'<tbody data-o-node="{_esc(o_node)}"><tr><th colspan="{len(_QK_COLUMNS)}">o node '
            f"{_esc(o_label)} <code>{_esc(o_node)}</code></th></tr>{rows}</tbody>"
        )
    table = f'<table id="vpd-qk"><thead><tr>{header}</tr></thead>{"".join(bodies)}</table>'
    return f'<div class="vpd-scroll">{table}</div>', _QK_JS


def _report(report: dict[str, Any]) -> str:
    """The faithfulness report (P(target) under the target, CI, stochastic and adversarial masks) as one table."""
    if not report:
        return ""
    head = "".join(f"<th>{_esc(k)}</th>" for k in report)
    cells = "".join(f"<td>{_esc(_fmt(v))}</td>" for v in report.values())
    return f'<table id="vpd-report"><tr>{head}</tr><tr>{cells}</tr></table>'


def _legend() -> str:
    swatches = "".join(f'<span><i class="sw" style="background:{c}"></i>{name}</span>' for name, c in _LEGEND)
    return (
        swatches
        + f'<span><i class="sw" style="background:{_POSITIVE_EDGE}"></i>+ edge</span>'
        + f'<span><i class="sw" style="background:{_NEGATIVE_EDGE}"></i>− edge</span>'
    )


def render_html(
    G: nx.DiGraph,
    path: str | Path,
    *,
    title: str | None = None,
    harvest: Any = None,
    max_nodes: int = 1000,
    max_edges: int = 20_000,
    payload: dict[str, Any] | None = None,
) -> Path:
    """Write the graph explorer for `G`: one HTML file that works offline and loads nothing.

    Token columns with the prompt along the bottom and the logits on top, one named row per block
    and matrix; hover cards, click to list a node's inputs and outputs, ctrl/cmd-click to pin,
    supernodes, pruning sliders, q/k pairs of a selected o node, JSON/SVG/PNG export and the view
    kept in the URL hash.

    Args:
        G: A pruned attribution graph (see `attrgraph.export`); it is not modified. Nodes without
            `influence` get circuit-tracer's influence computed from the edges.
        path: The .html file to write, atomically.
        title: The page title; defaults to one naming the target token.
        harvest: Optional examples for the hover cards and dashboards, anything
            `attrgraph.examples.cards_for` reads: a run or `vpd harvest --out` folder (its `examples/`, else its
            `harvest.json`), a `ComponentExamples`, or a mapping of component key → card.
        max_nodes: Refuse larger graphs.
        max_edges: Refuse graphs with more edges than this.
        payload: `explorer_payload(G, harvest=harvest, title=title)` when the caller has built it already
            (e.g. to send it to a client too); built here otherwise.

    Returns:
        The path written.

    Raises:
        VpdError: If `G` exceeds `max_nodes` or `max_edges`, a node lacks kind/pos, or `harvest` is a
            folder without a harvest.
    """
    check_limit(G.number_of_nodes(), max_nodes, "nodes", "max_nodes", "HTML")
    check_limit(G.number_of_edges(), max_edges, "edges", "max_edges", "HTML")
    g = G.graph
    if title is None:
        title = f"Attribution graph for {g.get('target_token', '')!r} at position {g.get('target_pos')}"
    if payload is None:
        payload = explorer_payload(G, harvest=harvest, title=title)
    qk_table, qk_js = _qk_table(G)
    parts = {
        "title": _esc(title),
        "css": _asset("explorer.css"),
        "prompt": _esc(g.get("prompt", "")),
        "target": _esc(g.get("target_token", "")),
        "target_pos": _esc(g.get("target_pos", "")),
        "report": _report(g.get("report") or {}),
        "legend": _legend(),
        "qk_table": qk_table,
        "qk_js": qk_js,
        "data": script_json(payload),
        "vis": _script("vis-network.min.js"),
        "explorer": _script("explorer.js"),
    }
    page = _TEMPLATE_FIELD.sub(lambda m: parts[m.group(1)], _asset("page.html"))
    return atomic_write_text(path, page)

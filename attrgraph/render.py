"""Draw an attribution graph: an offline, interactive HTML page (pyvis) or a static PNG (matplotlib).

Both use the circuit-tracer/Neuronpedia grid (attribution-graphs.md §9): x from the token position,
y from the grid row (embeddings at the bottom, logits on top), and within one (position, row) cell
the nodes spread horizontally, ordered by CI (logits by probability). Edges are blue when positive
and red when negative, with width (HTML) or opacity (PNG) proportional to |weight| / max |weight|;
node opacity is proportional to CI. The graph convention is in `attrgraph.export`.

The HTML is a disposable view, never read back; the JSON export is the artifact.
"""

from __future__ import annotations

import html
import importlib.util
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import networkx as nx

from decomposer.errors import VpdError
from decomposer.io import atomic_write_bytes, atomic_write_text

_KIND_RGB = {"comp": (60, 60, 60), "emb": (44, 160, 44), "logit": (255, 127, 14), "delta": (148, 103, 189)}
_KIND_SHAPE = {"comp": "dot", "emb": "square", "logit": "diamond", "delta": "triangle"}
_POSITIVE, _NEGATIVE = (31, 119, 180), (214, 39, 40)
_ROW_PX = 110
_MIN_NODE_GAP_PX = 26

# Physics off and straight edges in one options object: per-node `physics: false` is not honoured
# on larger graphs, and the positions below are final.
_VIS_OPTIONS = {
    "physics": {"enabled": False},
    "edges": {"smooth": False, "arrows": {"to": {"enabled": True, "scaleFactor": 0.4}}},
    "nodes": {"font": {"size": 10}},
    "interaction": {"hover": True, "tooltipDelay": 80, "hideEdgesOnDrag": True},
}

# Runs after pyvis's own script, which leaves `network`, `nodes` and `edges` as globals.
_CLICK_JS = """
<script type="text/javascript">
(function () {
  // Python HTML-escaped every label and tooltip so that no token can end a script block; vis draws
  // them as plain text (canvas, innerText), so undo exactly the escapes html.escape makes.
  function plain(s) {
    if (typeof s !== "string") { return s; }
    return s.replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&quot;/g, '"')
      .replace(/&#x27;/g, "'").replace(/&#47;/g, "/").replace(/&amp;/g, "&");
  }
  nodes.update(nodes.get().map(function (n) { return {id: n.id, label: plain(n.label), title: plain(n.title)}; }));
  edges.update(edges.get().map(function (e) { return {id: e.id, title: plain(e.title)}; }));
  var base = {};
  edges.forEach(function (e) { base[e.id] = e.color; });
  var dim = "rgba(200,200,200,0.12)";
  network.on("selectNode", function (params) {
    var keep = {};
    params.nodes.forEach(function (n) {
      network.getConnectedEdges(n).forEach(function (id) { keep[id] = true; });
    });
    edges.update(edges.getIds().map(function (id) { return {id: id, color: keep[id] ? base[id] : dim}; }));
  });
  network.on("deselectNode", function () {
    edges.update(edges.getIds().map(function (id) { return {id: id, color: base[id]}; }));
  });
})();
</script>
"""

_PANEL_CSS = (
    "#vpd-panel{font-family:sans-serif;font-size:13px;padding:6px 12px;border-bottom:1px solid #ccc}"
    "#vpd-panel table{border-collapse:collapse;margin:4px 16px 4px 0;display:inline-table;vertical-align:top}"
    "#vpd-panel td,#vpd-panel th{border:1px solid #ddd;padding:2px 6px;text-align:left}"
    "#vpd-panel code{background:#f4f4f4;padding:0 3px;white-space:pre}"
    # The q/k table can hold hundreds of rows; it scrolls so the graph below stays in view.
    ".vpd-scroll{display:inline-block;max-height:240px;overflow:auto;vertical-align:top}"
)

# Leftmost match wins, as in a browser: a tag inside a comment or a script is part of it.
_COMMENT_SCRIPT_OR_LINK = re.compile(r"<!--.*?-->|<script\b[^>]*>.*?</script\s*>|<link\b[^>]*>", re.S | re.I)
_REMOTE_SCRIPT = re.compile(r"""<script\b[^>]*\bsrc\s*=\s*["']?\s*(?:https?:)?//""", re.I)
_REMOTE_LINK = re.compile(r"""<link\b[^>]*\bhref\s*=\s*["']?\s*(?:https?:)?//""", re.I)
_EMPTY_HEADING = re.compile(r"<center>\s*<h1>\s*</h1>\s*</center>", re.I)
_URL_SCHEME = re.compile(r"(https?)://", re.I)


def _esc(value: Any) -> str:
    """HTML-escape any value; '://' is broken up too so the page holds no URL-like text at all."""
    return html.escape(str(value)).replace("://", ":&#47;&#47;")


def _unit(x: Any) -> float:
    x = float(x)
    return min(max(x, 0.0), 1.0) if math.isfinite(x) else 0.0


def _check_limit(n: int, limit: int, what: str, arg: str, target: str) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise VpdError(f"`{arg}` must be a positive int; got {limit!r}.")
    if n > limit:
        raise VpdError(
            f"Graph has {n:,} {what}, above `{arg}`={limit:,} for {target} rendering. Prune first with "
            f"`prune_graph(graph, node_threshold=0.8)` or raise `{arg}`."
        )


def _grid(G: nx.DiGraph) -> tuple[dict[str, tuple[float, int]], float]:
    """(x in column units, row) per node, and the spacing between neighbours in one cell."""
    cells: dict[tuple[int, int], list[str]] = defaultdict(list)
    for n, attrs in G.nodes(data=True):
        for name in ("kind", "pos", "row"):
            if name not in attrs:
                raise VpdError(
                    f"Node {n!r} has no `{name}` attribute; every node needs kind, pos and row for the grid "
                    "layout (see attrgraph.export)."
                )
        cells[(int(attrs["pos"]), int(attrs["row"]))].append(n)
    widest = max((len(c) for c in cells.values()), default=1)
    step = min(0.8 / widest, 0.25)  # the widest cell fills 80% of a column
    xy: dict[str, tuple[float, int]] = {}
    for (pos, row), members in cells.items():
        members.sort(key=lambda n: (-_cell_rank(G.nodes[n]), n))
        for i, n in enumerate(members):
            xy[n] = (pos + (i - (len(members) - 1) / 2) * step, row)
    return xy, step


def _cell_rank(a: dict[str, Any]) -> float:
    """Logits rank by probability, every other node by CI; larger comes first."""
    value = float(a.get("prob", 0.0) if a["kind"] == "logit" else a.get("ci", 0.0))
    return value if math.isfinite(value) else -math.inf


def _max_abs_weight(G: nx.DiGraph) -> float:
    weights = [abs(float(w)) for _, _, w in G.edges(data="weight", default=0.0) if math.isfinite(float(w))]
    return max(weights, default=0.0) or 1.0


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _tooltip(n: str, a: dict[str, Any]) -> str:
    lines = [str(a.get("label", n)), f"id: {n}", f"kind: {a['kind']}"]
    if a.get("module") is not None:
        lines.append(f"module: {a['module']}")
    for key, name in (("ci", "CI"), ("activation", "activation"), ("influence", "influence"), ("prob", "prob")):
        if a.get(key) is not None:
            lines.append(f"{name}: {_fmt(a[key])}")
    lines.append(f"token: {a.get('token', '')!r} (pos {a['pos']})")
    if a.get("top_tokens"):
        lines.append("top tokens: " + ", ".join(repr(str(t)) for t in a["top_tokens"]))
    return _esc("\n".join(lines))


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

# When an o node with q/k pairs is selected, show only its group; deselecting shows every group again.
# Runs on `load`, after pyvis's script has created the global `network`.
_QK_JS = """
<script type="text/javascript">
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
</script>
"""


def _qk_cell(pair: dict[str, Any], keys: tuple[str, ...]) -> str:
    value = next((pair[k] for k in keys if pair.get(k) is not None), "")
    return f"<td>{_esc(_fmt(value))}</td>"


def _qk_table(G: nx.DiGraph) -> str:
    """The q/k pairs as one table body per o node, in first-seen order; every value escaped."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for pair in G.graph.get("qk_pairs", []):
        groups[str(pair.get("o_node", ""))].append(pair)
    header = "".join(f"<th>{name}</th>" for name, _ in _QK_COLUMNS)
    bodies = []
    for o_node, pairs in groups.items():
        o_label = pairs[0].get("o_label") or (G.nodes[o_node].get("label") if o_node in G else None) or o_node
        rows = "".join("<tr>" + "".join(_qk_cell(p, keys) for _, keys in _QK_COLUMNS) + "</tr>" for p in pairs)
        bodies.append(
            f'<tbody data-o-node="{_esc(o_node)}"><tr><th colspan="{len(_QK_COLUMNS)}">o node '
            f"{_esc(o_label)} <code>{_esc(o_node)}</code></th></tr>{rows}</tbody>"
        )
    if not bodies:
        return "<table><tr><th>q/k pairs</th></tr><tr><td>none</td></tr></table>"
    table = f'<table id="vpd-qk"><thead><tr>{header}</tr></thead>{"".join(bodies)}</table>'
    return f'<div class="vpd-scroll">{table}</div>' + _QK_JS


def _panel(G: nx.DiGraph, title: str) -> str:
    g = G.graph
    tokens = " ".join(f"<code>{i}:{_esc(t)}</code>" for i, t in enumerate(g.get("prompt_tokens", [])))
    report = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(_fmt(v))}</td></tr>" for k, v in g.get("report", {}).items())
    return (
        f'<style>{_PANEL_CSS}</style><div id="vpd-panel"><h2>{_esc(title)}</h2>'
        f"<div><b>Prompt:</b> <code>{_esc(g.get('prompt', ''))}</code></div>"
        f"<div><b>Tokens:</b> {tokens}</div>"
        f"<div><b>Target:</b> <code>{_esc(g.get('target_token', ''))}</code> at position "
        f"{_esc(g.get('target_pos', ''))}</div>"
        f"<table><tr><th>report</th><th>value</th></tr>{report}</table>"
        f"{_qk_table(G)}"
        "<div>Edges: blue positive, red negative, width ∝ |weight|; dashed edges cross positions. "
        "Node opacity ∝ CI. Click a node to highlight its edges; click an o node to show only its q/k pairs "
        "(strength = head share × attention × DD, see attrgraph.qk).</div></div>"
    )


def _offline_block(match: re.Match[str]) -> str:
    block = match.group(0)
    if block.startswith("<!--") or _REMOTE_SCRIPT.match(block) or _REMOTE_LINK.match(block):
        # pyvis issues #228/#229: the template links bootstrap from a CDN even with in_line resources.
        return ""
    # In JS strings and regexes '\/' means '/', so this leaves behaviour unchanged (vis uses the SVG
    # namespace URL) while the page holds no 'http://' text.
    return _URL_SCHEME.sub(r"\1:\\/\\/", block)


def _offline(page: str) -> str:
    """Drop remote assets, HTML comments and empty headings; hide URL schemes inside scripts."""
    return _EMPTY_HEADING.sub("", _COMMENT_SCRIPT_OR_LINK.sub(_offline_block, page))


def render_html(
    G: nx.DiGraph, path: str | Path, *, title: str | None = None, max_nodes: int = 1000, max_edges: int = 10_000
) -> Path:
    """Write an interactive, self-contained HTML view of `G` that works offline.

    Hovering a node shows its label, kind, CI, activation, influence, token and top tokens; clicking
    it highlights its edges and dims the rest. A panel above the graph shows the prompt, the target,
    the faithfulness report and the q/k pairs.

    Args:
        G: An attribution graph (see `attrgraph.export`); it is not modified.
        path: The .html file to write, atomically.
        title: The page title; defaults to one naming the target token.
        max_nodes: Refuse larger graphs: the browser slows down past about 1k nodes.
        max_edges: Refuse graphs with more edges than this.

    Returns:
        The path written.

    Raises:
        VpdError: If `G` exceeds `max_nodes` or `max_edges`, a node lacks kind/pos/row, or pyvis is
            not installed.
    """
    _check_limit(G.number_of_nodes(), max_nodes, "nodes", "max_nodes", "HTML")
    _check_limit(G.number_of_edges(), max_edges, "edges", "max_edges", "HTML")
    if importlib.util.find_spec("pyvis") is None:
        raise VpdError("render_html needs pyvis, which is not installed. Install it with `pip install 'pyvis>=0.3.2'`.")
    from pyvis.network import Network

    # pyvis writes attributes back into graphs it is given (from_nx sets `size`); it only ever sees
    # plain dicts built from this copy, so the caller's graph stays untouched.
    view = G.copy()
    if title is None:
        title = (
            f"Attribution graph for {view.graph.get('target_token', '')!r} at position {view.graph.get('target_pos')}"
        )
    xy, step = _grid(view)
    col_px = max(180.0, _MIN_NODE_GAP_PX / step)
    top_row = max((r for _, r in xy.values()), default=0)
    net = Network(height="780px", width="100%", directed=True, cdn_resources="in_line", heading="")
    for n, a in view.nodes(data=True):
        kind = a["kind"]
        r, g, b = _KIND_RGB.get(kind, (60, 60, 60))
        alpha = max(_unit(a.get("ci", 1.0)), 0.08)  # keep near-zero CI nodes visible as outlines
        x, row = xy[n]
        net.add_node(
            n,
            label=_esc(a.get("label", n)),
            title=_tooltip(n, a),
            shape=_KIND_SHAPE.get(kind, "dot"),
            color=f"rgba({r},{g},{b},{alpha:.3f})",
            size=9,
            x=round(x * col_px, 2),
            y=(top_row - row) * _ROW_PX,
        )
    top = _max_abs_weight(view)
    for u, v, a in view.edges(data=True):
        w = float(a.get("weight", 0.0))
        frac = _unit(abs(w) / top)
        r, g, b = _POSITIVE if w >= 0 else _NEGATIVE
        net.add_edge(
            u,
            v,
            width=round(0.5 + 5.5 * frac, 3),
            color=f"rgba({r},{g},{b},{0.25 + 0.75 * frac:.3f})",
            title=_esc(f"{u} → {v}\nweight: {w:.4g}"),
            dashes=bool(a.get("cross_position", False)),
        )
    net.set_options(json.dumps(_VIS_OPTIONS))
    page = net.generate_html()
    page = page.replace("<head>", f"<head>\n<title>{_esc(title)}</title>", 1)
    page = page.replace("<body>", "<body>\n" + _panel(view, title), 1)
    page = page.replace("</body>", _CLICK_JS + "</body>", 1)
    return atomic_write_text(path, _offline(page))


def render_png(G: nx.DiGraph, path: str | Path, *, max_nodes: int = 1000) -> Path:
    """Write a static PNG of `G` on the same grid as `render_html`.

    Args:
        G: An attribution graph (see `attrgraph.export`); it is not modified.
        path: The .png file to write, atomically.
        max_nodes: Refuse larger graphs, whose labels would be unreadable.

    Returns:
        The path written.

    Raises:
        VpdError: If `G` exceeds `max_nodes` or a node lacks kind/pos/row.
    """
    _check_limit(G.number_of_nodes(), max_nodes, "nodes", "max_nodes", "PNG")
    # The Agg canvas directly, not pyplot: no global backend switch and no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    xy, _ = _grid(G)
    tokens = list(G.graph.get("prompt_tokens", []))
    n_cols = max([len(tokens)] + [int(a["pos"]) + 1 for _, a in G.nodes(data=True)])
    n_rows = max((r for _, r in xy.values()), default=0) + 1
    fig = Figure(figsize=(min(4 + 1.6 * n_cols, 40), min(2 + 0.9 * n_rows, 30)), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = _max_abs_weight(G)
    segments, colors, widths = [], [], []
    for u, v, w in G.edges(data="weight", default=0.0):
        frac = _unit(abs(float(w)) / top)
        rgb = _POSITIVE if float(w) >= 0 else _NEGATIVE
        segments.append([xy[u], xy[v]])
        colors.append((*(c / 255 for c in rgb), max(frac, 0.05)))
        widths.append(0.3 + 2.2 * frac)
    ax.add_collection(LineCollection(segments, colors=colors, linewidths=widths, zorder=1))
    xs, ys, node_colors = [], [], []
    for n, a in G.nodes(data=True):
        rgb = _KIND_RGB.get(a["kind"], (60, 60, 60))
        x, row = xy[n]
        xs.append(x)
        ys.append(row)
        node_colors.append((*(c / 255 for c in rgb), max(_unit(a.get("ci", 1.0)), 0.08)))
        # Slanted so that neighbours in one cell do not overprint; parse_math=False keeps "$x$" as text.
        ax.text(x, row + 0.1, str(a.get("label", n)), fontsize=5, rotation=25, zorder=3, parse_math=False)
    ax.scatter(xs, ys, s=40, c=node_colors, edgecolors="none", zorder=2)
    ax.set_xticks(range(n_cols))
    ticks = [f"{i}:{tokens[i]}" if i < len(tokens) else str(i) for i in range(n_cols)]
    ax.set_xticklabels(ticks, fontsize=7, parse_math=False)
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.set_ylim(-0.5, n_rows - 0.3)
    ax.set_ylabel("row (embeddings at 0, logits on top)")
    ax.set_title(str(G.graph.get("prompt", "")), fontsize=9, parse_math=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())

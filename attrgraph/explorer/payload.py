"""The data the graph explorer draws: named rows, token columns, node positions, edges, influence and cards.

Everything here is plain JSON. Rows are named by block and matrix (`L2 mlp down`), embeddings at
the bottom and logits on top; a column per prompt position, each as wide as its busiest cell; inside a
cell the nodes sit left to right by influence (logits by probability).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import networkx as nx

from attrgraph.examples import cards_for
from attrgraph.labels import component_key
from attrgraph.nodes import SUBLAYER_ORDER, SUBLAYER_PART
from attrgraph.prune import graph_influence
from decomposer.errors import VpdError

PAYLOAD_VERSION = 1
ROW_HEIGHT = 64.0  # graph units between row centres
BLOCK_ROW_HEIGHT = 40.0  # the same with one row per block: a 30-block model's rows fit one screen
NODE_GAP = 20.0  # graph units between neighbours in one cell
MIN_COLUMN = 96.0  # a column never narrower than this, so a token fits under it
MAX_DRAWN_EDGES = 2000  # edges the first view draws at most
CONTEXTS_PER_CARD = 10  # activating contexts a node's dashboard shows

MAX_MATRIX_ROWS = 40  # above this many matrix rows, the first view shows one row per block


def _finite(x: Any, default: float = 0.0) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


def _json_native(value: Any) -> Any:
    """`value` with non-finite floats as None, so the embedded JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_native(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_native(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def _cumulative(values: list[float]) -> list[float]:
    """Exclusive prefix sums: where each column starts."""
    out, total = [], 0.0
    for v in values:
        out.append(total)
        total += v
    return out


def _row_of(a: Mapping[str, Any]) -> tuple[tuple, str]:
    """(sort key, name) of a node's row: `Emb`, `L{block} {attn|mlp} {matrix}` or `Logits`."""
    kind = a.get("kind")
    if kind == "emb":
        return (0,), "Emb"
    if kind == "logit":
        return (2,), "Logits"
    block, sub = a.get("block"), a.get("sublayer")
    if block is not None and sub is not None:
        name = f"L{int(block)} {SUBLAYER_PART.get(sub, '')} {sub}"
        return (1, int(block), SUBLAYER_ORDER.get(str(sub), 99), str(sub)), name
    module = str(a.get("module") or kind)
    return (1, math.inf, int(a.get("row", 0)), module), module


def _block_row_of(a: Mapping[str, Any]) -> tuple[tuple, str]:
    """(sort key, name) of a node's row when each block is one row: `Emb`, `L{block}` or `Logits`."""
    block = a.get("block")
    if a.get("kind") in ("emb", "logit") or block is None:
        return _row_of(a)
    return (1, int(block)), f"L{int(block)}"


def _sublayer_rank(a: Mapping[str, Any]) -> int:
    return SUBLAYER_ORDER.get(str(a.get("sublayer")), 99)


def _grid(
    G: nx.DiGraph,
    influence: Mapping[str, float],
    n_cols: int,
    row_of: Callable[[Mapping[str, Any]], tuple[tuple, str]],
    in_cell: Callable[[str], tuple],
    row_height: float = ROW_HEIGHT,
) -> dict[str, Any]:
    """One grid layout: named rows bottom to top, column extents, and each node's (x, y, row).

    Each column is as wide as its own busiest cell, so sparse positions stay narrow and busy ones get room;
    inside a cell the nodes sit left to right by `in_cell` (e.g. matrix order), then by influence.
    """
    rows: dict[tuple, str] = {}
    row_key: dict[str, tuple] = {}
    for n, a in G.nodes(data=True):
        row_key[n], rows[row_key[n]] = row_of(a)
    order = sorted(rows, key=lambda k: tuple((0, x) if isinstance(x, int | float) else (1, x) for x in k))
    row_index = {k: i for i, k in enumerate(order)}
    cells: dict[tuple[int, int], list[str]] = defaultdict(list)
    for n, a in G.nodes(data=True):
        cells[(int(a["pos"]), row_index[row_key[n]])].append(n)
    busiest = [1] * n_cols
    for (pos, _), members in cells.items():
        busiest[pos] = max(busiest[pos], len(members))
    widths = [max(MIN_COLUMN, b * NODE_GAP + NODE_GAP) for b in busiest]
    lefts = _cumulative(widths)
    top = len(order) - 1
    at: dict[str, tuple[float, float, int]] = {}
    for (pos, r), members in cells.items():
        members.sort(key=lambda n: (*in_cell(n), -_rank(G.nodes[n], influence[n]), n))
        left = lefts[pos] + widths[pos] / 2 - (len(members) - 1) * NODE_GAP / 2
        for i, n in enumerate(members):
            at[n] = (round(left + i * NODE_GAP, 2), (top - r) * row_height, r)
    return {
        "rows": [rows[k] for k in order],
        "columns": [[left, width] for left, width in zip(lefts, widths, strict=True)],
        "width": lefts[-1] + widths[-1],
        "at": at,
        "row_height": row_height,
    }


def _rank(a: Mapping[str, Any], influence: float) -> float:
    value = _finite(a.get("prob")) if a.get("kind") == "logit" else influence
    return value if math.isfinite(value) else -math.inf


def _scored(entries: list[Mapping[str, Any]], *scores: str) -> list[list[Any]]:
    """[[token, score, …], …] of a card's token list, scores rounded for the page."""
    return [[str(e.get("token")), *(_round(e.get(s)) for s in scores)] for e in entries]


def _round(x: Any, digits: int = 3) -> float | None:
    x = _finite(x, math.nan)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


class _TokenTable:
    """Context tokens as indices into one table: each string is written once however many contexts hold it."""

    def __init__(self) -> None:
        self.strings: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        i = self._index.get(text)
        if i is None:
            i = self._index[text] = len(self.strings)
            self.strings.append(text)
        return i


def _compact_card(card: Mapping[str, Any], table: _TokenTable, n_contexts: int) -> dict[str, Any]:
    """The parts of a card the hover card and the dashboard show, in the page's compact form."""
    contexts = []
    for ctx in (card.get("contexts") or [])[:n_contexts]:
        text = [str(t) for t in ctx.get("text") or []]
        ci = [max(0, min(100, round(100 * _finite(x)))) for x in ctx.get("ci") or [0.0] * len(text)]
        contexts.append({"t": [table(t) for t in text], "c": int(ctx.get("center", 0)), "ci": ci})
    return {
        "density": _round(card.get("density"), 4),
        "firing_count": card.get("firing_count"),
        "n_tokens": card.get("n_tokens"),
        "inputs": _scored(card.get("inputs") or [], "precision", "recall"),
        "outputs": _scored(card.get("outputs") or [], "pmi"),
        "outputs_bottom": _scored(card.get("outputs_bottom") or [], "pmi"),
        "promotes": _scored(card.get("promotes") or [], "logit"),
        "suppresses": _scored(card.get("suppresses") or [], "logit"),
        "words": [[str(w), _round(share)] for w, share in card.get("words") or []],
        "cofiring": [
            [str(e.get("key")), _round(e.get("jaccard")), str(e.get("label") or "")] for e in card.get("cofiring") or []
        ],
        "contexts": contexts,
        "label": str(card.get("label") or ""),
    }


def _check_nodes(G: nx.DiGraph) -> None:
    for n, a in G.nodes(data=True):
        for name in ("kind", "pos"):
            if name not in a:
                raise VpdError(
                    f"Node {n!r} has no `{name}` attribute; every node needs kind and pos for the grid layout "
                    "(see attrgraph.export)."
                )


def _node_influence(G: nx.DiGraph) -> dict[str, float]:
    """The pipeline's influence where a node has it; the same rule computed from the edges elsewhere."""
    given = {n: a.get("influence") for n, a in G.nodes(data=True)}
    computed = graph_influence(G) if any(v is None for v in given.values()) else {}
    return {n: _finite(v) if v is not None else computed[n] for n, v in given.items()}


def _qk_entries(G: nx.DiGraph, index: Mapping[str, int]) -> list[dict[str, Any]]:
    """The graph's q/k pairs of o nodes that are in it, by node index (a q or k outside the graph is None)."""
    qk = []
    for pair in G.graph.get("qk_pairs", []) or []:
        o, q, k = pair.get("o_node"), pair.get("q_node"), pair.get("k_node")
        if o in index:
            qk.append(
                {
                    "o": index[o],
                    "q": index.get(q),
                    "k": index.get(k),
                    "q_label": str(pair.get("q_label") or q),
                    "k_label": str(pair.get("k_label") or k),
                    "key_pos": pair.get("key_pos"),
                    "strength": _finite(pair.get("strength")),
                }
            )
    return qk


def _edge_threshold(edges: list[list[Any]]) -> float:
    """A few thousand edges read as a hairball: the first view draws the strongest `MAX_DRAWN_EDGES`, and the
    edge slider starts at their share of the total |weight|."""
    strengths = sorted((abs(e[2]) for e in edges), reverse=True)
    if len(strengths) > MAX_DRAWN_EDGES and sum(strengths) > 0:
        return math.floor(100 * sum(strengths[:MAX_DRAWN_EDGES]) / sum(strengths)) / 100
    return 1.0


def _layouts(G: nx.DiGraph, influence: Mapping[str, float], n_cols: int) -> tuple[dict[str, dict], str]:
    """Both grids (matrix rows, block rows) and the name of the one the first view uses."""
    layouts = {
        "matrix": _grid(G, influence, n_cols, _row_of, lambda n: ()),
        "block": _grid(G, influence, n_cols, _block_row_of, lambda n: (_sublayer_rank(G.nodes[n]),), BLOCK_ROW_HEIGHT),
    }
    return layouts, "block" if len(layouts["matrix"]["rows"]) > MAX_MATRIX_ROWS else "matrix"


def explorer_payload(
    G: nx.DiGraph, *, harvest: Any = None, title: str = "", n_contexts: int = CONTEXTS_PER_CARD
) -> dict[str, Any]:
    """Everything the explorer page needs, as one JSON-ready dict.

    Two grids are laid out (`_grid`): one row per matrix, and one row per block for deep models; the first
    view uses the block rows when there are more than `MAX_MATRIX_ROWS` matrix rows, and the page switches.

    Args:
        G: A pruned attribution graph (see `attrgraph.export`); it is not modified.
        harvest: Optional per-subcomponent examples and statistics for the hover cards and dashboards,
            anything `attrgraph.examples.cards_for` reads: a run folder or `vpd harvest --out` folder (its
            `examples/`, else its `harvest.json`), a `ComponentExamples`, or a mapping of component key → card.
        title: The page title.
        n_contexts: Activating contexts kept per card.

    Raises:
        VpdError: If a node lacks `kind` or `pos`, or the graph has a cycle.
    """
    _check_nodes(G)
    influence = _node_influence(G)
    tokens = [str(t) for t in G.graph.get("prompt_tokens", [])]
    n_cols = max([len(tokens)] + [int(a["pos"]) + 1 for _, a in G.nodes(data=True)] + [1])
    ids = list(G.nodes)
    index = {n: i for i, n in enumerate(ids)}
    layouts, default = _layouts(G, influence, n_cols)
    first = layouts[default]
    keys = {
        n: component_key(str(a["module"]), int(a["index"]))
        for n, a in G.nodes(data=True)
        if a["kind"] == "comp" and a.get("module") is not None and a.get("index") is not None
    }
    table = _TokenTable()
    found = cards_for(harvest, list(keys.values()), n_contexts=n_contexts)
    nodes = []
    for n in ids:
        a = G.nodes[n]
        x, y, r = first["at"][n]
        nodes.append(
            {"id": n, "key": keys.get(n), "kind": a["kind"], "sub": a.get("sublayer"), "row": r, "x": x, "y": y}
            | {"inf": influence[n], "attrs": _json_native(dict(a))}
        )
    edges = [
        [index[u], index[v], _finite(w), bool(G.edges[u, v].get("cross_position", False))]
        for u, v, w in G.edges(data="weight", default=0.0)
    ]
    graph_attrs = _json_native(dict(G.graph))
    return {
        "version": PAYLOAD_VERSION,
        "title": title,
        "tokens": tokens,
        "n_cols": n_cols,
        **{name: first[name] for name in ("columns", "width", "row_height", "rows")},
        "layout": default,
        # Both grids, node positions as [x, y, row] in node order: the page switches between them.
        "layouts": {
            name: {k: lay[k] for k in ("rows", "columns", "width", "row_height")}
            | {"at": [list(lay["at"][n]) for n in ids]}
            for name, lay in layouts.items()
        },
        "nodes": nodes,
        "edges": edges,
        "qk": _qk_entries(G, index),
        "edge_threshold": _edge_threshold(edges),
        "cards": {key: _compact_card(card, table, n_contexts) for key, card in found.items()},
        "card_tokens": table.strings,
        "report": graph_attrs.get("report") or {},
        "target_token": graph_attrs.get("target_token"),
        "graph": graph_attrs,
    }

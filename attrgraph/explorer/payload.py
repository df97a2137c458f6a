"""The data the graph explorer draws: named rows, token columns, node positions, edges, influence and cards.

Everything here is plain JSON. Rows are named by block and matrix (`L2 mlp down`), embeddings at
the bottom and logits on top; a column per prompt position, each as wide as its busiest cell; inside a
cell the nodes sit left to right by influence (logits by probability).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx

from attrgraph.labels import component_key, harvest_meta_path, read_harvest_meta
from decomposer.errors import VpdError

PAYLOAD_VERSION = 1
ROW_HEIGHT = 64.0  # graph units between row centres
NODE_GAP = 20.0  # graph units between neighbours in one cell
MIN_COLUMN = 96.0  # a column never narrower than this, so a token fits under it
MAX_DRAWN_EDGES = 2000  # edges the first view draws at most

# Matrix order inside a block, bottom to top, as the residual stream meets them.
SUBLAYER_ORDER = {"q": 0, "k": 1, "v": 2, "qkv": 3, "o": 4, "gate": 5, "up": 6, "down": 7}
_PART = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}


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


def fallback_influence(G: nx.DiGraph) -> dict[str, float]:
    """Influence on the logits by circuit-tracer's rule, for graphs whose nodes carry none.

    Each node's incoming |weights| are normalised to sum to one (A), the logits weigh in with their
    probability (w, normalised), and a node's influence is w^T (A + A² + …) at that node: the sum
    over all paths to the logits. One pass in reverse topological order; cycles are refused.
    """
    if not nx.is_directed_acyclic_graph(G):
        raise VpdError("`G` has a cycle; attribution graphs are acyclic, so influence cannot be computed.")
    incoming = {v: sum(abs(_finite(w)) for _, _, w in G.in_edges(v, data="weight", default=0.0)) for v in G}
    logits = [n for n, k in G.nodes(data="kind") if k == "logit"]
    probs = {n: max(_finite(G.nodes[n].get("prob", 1.0)), 0.0) for n in logits}
    total = sum(probs.values()) or float(len(logits)) or 1.0
    reach: dict[str, float] = {}  # w + influence: what a node passes to its sources
    influence: dict[str, float] = {}
    for u in reversed(list(nx.topological_sort(G))):
        infl = 0.0
        for _, v, w in G.out_edges(u, data="weight", default=0.0):
            if incoming[v] > 0:
                infl += abs(_finite(w)) / incoming[v] * reach[v]
        influence[u] = infl
        reach[u] = infl + (probs.get(u, 1.0) / total if u in probs else 0.0)
    return influence


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
        return (1, int(block), SUBLAYER_ORDER.get(str(sub), 99), str(sub)), f"L{int(block)} {_PART.get(sub, '')} {sub}"
    module = str(a.get("module") or kind)
    return (1, math.inf, int(a.get("row", 0)), module), module


def _rank(a: Mapping[str, Any], influence: float) -> float:
    value = _finite(a.get("prob")) if a.get("kind") == "logit" else influence
    return value if math.isfinite(value) else -math.inf


def _card(
    summary: Mapping[str, Any], vocab: list[str] | None = None, n_tokens: int = 5, n_examples: int = 3
) -> dict[str, Any]:
    """The parts of a harvest summary a hover card shows; example token ids decode through `vocab`."""

    def decode(t: Any) -> str:
        return vocab[t] if vocab and isinstance(t, int) and 0 <= t < len(vocab) else f"#{t}"

    def tokens(key: str) -> list[str]:
        return [
            str(t.get("token") if t.get("token") is not None else f"#{t.get('id')}") for t in summary.get(key) or []
        ]

    examples = []
    for e in (summary.get("top_examples") or [])[:n_examples]:
        text = e.get("text") or [decode(t) for t in e.get("tokens", [])]
        examples.append({"text": [str(t) for t in text], "center": int(e.get("center", 0)), "ci": e.get("ci")})
    return {
        "density": summary.get("density"),
        "inputs": tokens("input_precision" if summary.get("input_precision") else "input_pmi")[:n_tokens],
        "outputs": tokens("output")[:n_tokens],
        "examples": examples,
        "label": summary.get("label") or "",
    }


def _harvest_source(harvest: Any) -> tuple[Any, list[str] | None]:
    """(summaries, vocab) from a mapping, a `Harvest`, or a run or harvest folder's `harvest.json`."""
    if not isinstance(harvest, str | Path):
        return harvest, None
    path = harvest_meta_path(harvest)
    if path is None:
        raise VpdError(
            f"`harvest` {str(harvest)!r} holds no harvest.json; run `vpd harvest --run RUN` first, or pass a "
            "mapping of component key → summary."
        )
    meta = read_harvest_meta(path)
    vocab = meta.get("vocab")
    return meta.get("components", {}), [str(v) for v in vocab] if isinstance(vocab, list) else None


def _summary_of(harvest: Any, key: str) -> Mapping[str, Any] | None:
    if harvest is None:
        return None
    if isinstance(harvest, Mapping):
        return harvest.get(key)
    try:  # a circuits.harvest_stats.Harvest: decoded example text comes with `text=True`
        return harvest.summary(harvest.flat_index(key), text=True)
    except VpdError:
        return None


def explorer_payload(G: nx.DiGraph, *, harvest: Any = None, title: str = "") -> dict[str, Any]:
    """Everything the explorer page needs, as one JSON-ready dict.

    Long because the layout is one pass: rows, column widths, node positions and cards depend on each other.

    Args:
        G: A pruned attribution graph (see `attrgraph.export`); it is not modified.
        harvest: Optional per-subcomponent statistics for hover cards: a run or harvest folder
            (its `harvest.json`), a mapping of component key → harvest summary, or a
            `circuits.harvest_stats.Harvest`.
        title: The page title.

    Raises:
        VpdError: If a node lacks `kind` or `pos`, or the graph has a cycle.
    """
    harvest, vocab = _harvest_source(harvest)
    for n, a in G.nodes(data=True):
        for name in ("kind", "pos"):
            if name not in a:
                raise VpdError(
                    f"Node {n!r} has no `{name}` attribute; every node needs kind and pos for the grid layout "
                    "(see attrgraph.export)."
                )
    # The pipeline's influence where a node has it; the same rule computed from the edges elsewhere.
    given = {n: a.get("influence") for n, a in G.nodes(data=True)}
    computed = fallback_influence(G) if any(v is None for v in given.values()) else {}
    influence = {n: _finite(v) if v is not None else computed[n] for n, v in given.items()}
    rows: dict[tuple, str] = {}
    row_key: dict[str, tuple] = {}
    for n, a in G.nodes(data=True):
        row_key[n], rows[row_key[n]] = _row_of(a)
    row_order = sorted(rows, key=lambda k: tuple((0, x) if isinstance(x, int | float) else (1, x) for x in k))
    row_index = {k: i for i, k in enumerate(row_order)}

    tokens = [str(t) for t in G.graph.get("prompt_tokens", [])]
    n_cols = max([len(tokens)] + [int(a["pos"]) + 1 for _, a in G.nodes(data=True)] + [1])
    cells: dict[tuple[int, int], list[str]] = defaultdict(list)
    for n, a in G.nodes(data=True):
        cells[(int(a["pos"]), row_index[row_key[n]])].append(n)
    # Each column as wide as its own busiest cell: sparse positions stay narrow, busy ones get room.
    busiest = [1] * n_cols
    for (pos, _), members in cells.items():
        busiest[pos] = max(busiest[pos], len(members))
    widths = [max(MIN_COLUMN, b * NODE_GAP + NODE_GAP) for b in busiest]
    lefts = _cumulative(widths)

    ids = list(G.nodes)
    index = {n: i for i, n in enumerate(ids)}
    x: dict[str, float] = {}
    for (pos, _), members in cells.items():
        members.sort(key=lambda n: (-_rank(G.nodes[n], influence[n]), n))
        left = lefts[pos] + widths[pos] / 2 - (len(members) - 1) * NODE_GAP / 2
        for i, n in enumerate(members):
            x[n] = left + i * NODE_GAP
    top = len(row_order) - 1

    nodes, cards = [], {}
    for n in ids:
        a = G.nodes[n]
        key = None
        if a["kind"] == "comp" and a.get("module") is not None and a.get("index") is not None:
            key = component_key(str(a["module"]), int(a["index"]))
            summary = _summary_of(harvest, key)
            if summary is not None and key not in cards:
                cards[key] = _card(summary, vocab)
        r = row_index[row_key[n]]
        nodes.append(
            {
                "id": n,
                "key": key,
                "kind": a["kind"],
                "sub": a.get("sublayer"),
                "row": r,
                "x": round(x[n], 2),
                "y": (top - r) * ROW_HEIGHT,
                "inf": influence[n],
                "attrs": _json_native(dict(a)),
            }
        )
    edges = [
        [index[u], index[v], _finite(w), bool(G.edges[u, v].get("cross_position", False))]
        for u, v, w in G.edges(data="weight", default=0.0)
    ]
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
    graph_attrs = _json_native(dict(G.graph))
    # A few thousand edges read as a hairball: the first view draws the strongest MAX_DRAWN_EDGES and
    # the edge slider starts at their share of the total |weight|.
    strengths = sorted((abs(e[2]) for e in edges), reverse=True)
    edge_threshold = 1.0
    if len(strengths) > MAX_DRAWN_EDGES and sum(strengths) > 0:
        edge_threshold = math.floor(100 * sum(strengths[:MAX_DRAWN_EDGES]) / sum(strengths)) / 100
    return {
        "version": PAYLOAD_VERSION,
        "title": title,
        "tokens": tokens,
        "n_cols": n_cols,
        "columns": [[left, width] for left, width in zip(lefts, widths, strict=True)],
        "width": lefts[-1] + widths[-1],
        "row_height": ROW_HEIGHT,
        "rows": [rows[k] for k in row_order],
        "nodes": nodes,
        "edges": edges,
        "qk": qk,
        "edge_threshold": edge_threshold,
        "cards": cards,
        "report": graph_attrs.get("report") or {},
        "target_token": graph_attrs.get("target_token"),
        "graph": graph_attrs,
    }

"""The static figure of an attribution graph (PNG or SVG), on the explorer's grid.

Named rows (`L1 mlp down`) in shaded bands per block, the prompt tokens along the x axis, the logit
labels on top, edges blue when positive and orange when negative with width and opacity by
|weight|, a glyph and colour per matrix, a legend, and the labels of the most influential nodes
placed so that none overlaps another.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import networkx as nx

from attrgraph.explorer.page import check_limit
from attrgraph.explorer.payload import MIN_COLUMN, explorer_payload
from decomposer.io import atomic_write_bytes

# (colour, marker) per matrix or node kind; the explorer uses the same colours.
_STYLE = {
    "q": ("#4f46e5", "^"),
    "k": ("#0891b2", "v"),
    "v": ("#9333ea", "s"),
    "qkv": ("#7c3aed", "s"),
    "o": ("#15803d", "o"),
    "gate": ("#a16207", "D"),
    "up": ("#ea580c", "h"),
    "down": ("#be185d", "*"),
    "emb": ("#6b7280", "s"),
    "logit": ("#111827", "D"),
    "delta": ("#9ca3af", "^"),
    "other": ("#374151", "o"),
}
_POSITIVE, _NEGATIVE = "#2563eb", "#ea580c"
_SLIVER = 0.35  # width of a column without subcomponents, in 0.9-inch units
_KEY_PREFIX = re.compile(r"^\S+:\d+(:\d+)?(@\d+)?\s*")


def show_token(token: str) -> str:
    """A token with its whitespace visible: ' her' → '␣her'."""
    return str(token).replace(" ", "\u2423").replace("\n", "\u23ce").replace("\t", "\u21e5")


def _style_key(node: dict[str, Any]) -> str:
    if node["kind"] == "comp":
        return node["sub"] if node["sub"] in _STYLE else "other"
    return node["kind"] if node["kind"] in _STYLE else "other"


def _short_label(node: dict[str, Any], limit: int = 44) -> str:
    label = str(node["attrs"].get("label") or "")
    if node["kind"] == "logit":
        token, prob = node["attrs"].get("logit_token"), node["attrs"].get("prob")
        if token is None:
            return label
        return show_token(token) + (f"  p={prob:.3g}" if isinstance(prob, float) else "")
    rest = _KEY_PREFIX.sub("", label) or node["key"] or label
    return rest if len(rest) <= limit else rest[: limit - 1] + "…"


def _place_labels(fig: Any, ax: Any, items: list[tuple[float, float, str]], fontsize: float) -> int:
    """Greedy placement, most important first: each label tries four spots and is dropped if all overlap."""
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    frame = ax.get_window_extent(renderer)
    offsets = ((6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"), (-6, -4, "right", "top"))
    kept = 0
    for x, y, text in items:
        for dx, dy, ha, va in offsets:
            artist = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                ha=ha,
                va=va,
                zorder=4,
                annotation_clip=False,
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
            )
            artist.set_parse_math(False) if hasattr(artist, "set_parse_math") else None
            box = artist.get_window_extent(renderer).expanded(1.05, 1.1)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                placed.append(box)
                kept += 1
                break
            artist.remove()
    return kept


def _figure(G: nx.DiGraph, max_labels: int) -> Any:
    """The static figure: bands, rows, token axis, edges, nodes, labels and legend, drawn in that order.

    One function because each layer reads the geometry the previous ones fixed (column widths, row heights).
    """
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    data = explorer_payload(G)
    n_rows, n_cols = len(data["rows"]), data["n_cols"]
    nodes = data["nodes"]
    # x in units of 0.9 inch: a column with subcomponents is as wide as in the explorer (wider the more
    # nodes sit side by side); a column holding only its embedding shrinks to a sliver, as in the paper.
    busy = {n["attrs"]["pos"] for n in nodes if n["kind"] != "emb"}
    spans = [(width / MIN_COLUMN if c in busy else _SLIVER) for c, (_, width) in enumerate(data["columns"])]
    starts = [sum(spans[:c]) for c in range(n_cols)]
    columns = list(zip(starts, spans, strict=True))
    total = starts[-1] + spans[-1]
    for n in nodes:
        left, width = data["columns"][n["attrs"]["pos"]]
        start, span = columns[n["attrs"]["pos"]]
        n["cx"], n["cy"] = start + (n["x"] - left) / width * span, n["row"]
    fig = Figure(figsize=(min(2.6 + 0.9 * total, 30), min(1.6 + 0.42 * n_rows, 24)), dpi=150)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    block, shade = None, False
    for r, name in enumerate(data["rows"]):
        b = name.split(" ")[0] if name.startswith("L") else name
        if b != block:
            block, shade = b, not shade
        if shade:
            ax.axhspan(r - 0.5, r + 0.5, color="#f3f4f6", zorder=0, lw=0)
    for left, _ in columns:
        ax.axvline(left, color="#e5e7eb", lw=0.6, zorder=0)

    top = max((abs(e[2]) for e in data["edges"]), default=0.0) or 1.0
    order = sorted(data["edges"], key=lambda e: abs(e[2]))  # strongest drawn last, on top
    segments = [[(nodes[u]["cx"], nodes[u]["cy"]), (nodes[v]["cx"], nodes[v]["cy"])] for u, v, _, _ in order]
    colors = [(_POSITIVE if w >= 0 else _NEGATIVE) for _, _, w, _ in order]
    alphas = [0.08 + 0.8 * abs(w) / top for _, _, w, _ in order]
    widths = [0.3 + 2.4 * abs(w) / top for _, _, w, _ in order]
    if segments:
        lc = LineCollection(segments, colors=colors, linewidths=widths, zorder=1)
        lc.set_alpha(None)
        from matplotlib.colors import to_rgba

        lc.set_color([to_rgba(c, a) for c, a in zip(colors, alphas, strict=True)])
        ax.add_collection(lc)

    present: dict[str, None] = {}
    for key in _STYLE:
        members = [n for n in nodes if _style_key(n) == key]
        if not members:
            continue
        present[key] = None
        color, marker = _STYLE[key]
        size = 70 if key in ("down", "logit") else 36
        ax.scatter(
            [n["cx"] for n in members], [n["cy"] for n in members], s=size, c=color, marker=marker, zorder=3, lw=0
        )

    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(data["rows"], fontsize=8)
    ax.set_xticks([left + width / 2 for left, width in columns])
    tokens = data["tokens"]
    narrow = min(span for _, span in columns) < 0.6  # under ~0.55 inch the labels turn upright
    ax.set_xticklabels(
        [f"{show_token(tokens[c]) if c < len(tokens) else ''}{'  ' if narrow else chr(10)}{c}" for c in range(n_cols)],
        fontsize=7 if narrow else 8,
        family="monospace",
        rotation=90 if narrow else 0,
    )
    for label in ax.get_xticklabels() + ax.get_yticklabels():
        label.set_parse_math(False) if hasattr(label, "set_parse_math") else None
    ax.set_xlim(0, total)
    ax.set_ylim(-0.6, n_rows - 0.4)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    title = str(G.graph.get("prompt", "")).replace("\n", " ")
    title = title if len(title) <= 100 else "…" + title[-99:]  # the end of a long prompt, where the target is
    target = G.graph.get("target_token")
    if target is not None:
        title += f"   →  {target!r} at position {G.graph.get('target_pos')}"
    ax.set_title(title, fontsize=9, loc="left", parse_math=False)
    handles = [Line2D([], [], ls="", marker=_STYLE[k][1], color=_STYLE[k][0], label=k, markersize=6) for k in present]
    handles += [Line2D([], [], color=_POSITIVE, label="+ edge"), Line2D([], [], color=_NEGATIVE, label="− edge")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()

    ranked = sorted(
        (n for n in nodes if n["kind"] != "emb"),
        key=lambda n: (n["kind"] != "logit", -(n["attrs"].get("prob") or 0.0) if n["kind"] == "logit" else -n["inf"]),
    )
    items = [(n["cx"], n["cy"], _short_label(n)) for n in ranked[:max_labels] if _short_label(n)]
    _place_labels(fig, ax, items, fontsize=6.5)
    return fig


def _save(G: nx.DiGraph, path: str | Path, fmt: str, max_nodes: int, max_labels: int) -> Path:
    check_limit(G.number_of_nodes(), max_nodes, "nodes", "max_nodes", fmt.upper())
    fig = _figure(G, max_labels)
    buf = io.BytesIO()
    # A fixed hash salt keeps SVG ids, and so the file, the same from run to run.
    from matplotlib import rc_context

    with rc_context({"svg.hashsalt": "vpd", "svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt, metadata={"Software": None} if fmt == "png" else {"Date": None})
    return atomic_write_bytes(path, buf.getvalue())


def render_png(G: nx.DiGraph, path: str | Path, *, max_nodes: int = 1000, max_labels: int = 40) -> Path:
    """Write the static figure of `G` as a PNG (150 dpi).

    Args:
        G: An attribution graph (see `attrgraph.export`); it is not modified.
        path: The .png file to write, atomically.
        max_nodes: Refuse larger graphs, whose figure would be unreadable.
        max_labels: Label at most this many of the most influential nodes (logits first); labels
            that would overlap are left out.

    Raises:
        VpdError: If `G` exceeds `max_nodes` or a node lacks kind/pos.
    """
    return _save(G, path, "png", max_nodes, max_labels)


def render_svg(G: nx.DiGraph, path: str | Path, *, max_nodes: int = 1000, max_labels: int = 40) -> Path:
    """Write the static figure of `G` as an SVG with its text kept as text; arguments as `render_png`."""
    return _save(G, path, "svg", max_nodes, max_labels)

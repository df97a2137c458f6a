"""Export attribution graphs: node-link JSON (the round-trippable form) and circuit-tracer JSON.

Every function here reads an `nx.DiGraph` in one convention (docs/attribution-graphs.md §8):

- Node ids are canonical strings: `comp/{module}/{c}@{t}`, `emb@{t}`, `logit/{token_id}@{t}` and
  `delta/{module}@{t}`.
- Node attributes:
  - `kind`: "comp", "emb", "logit" or "delta";
  - `module` (str or None), `block` (int or None), `sublayer` ("q", "k", "v", "o", "gate", "up",
    "down" or None), `pos` (int), `index` (int or None: c for comp nodes, the token id for logits);
  - `row`: the grid row, 0 for embeddings, each block's rows above it and the logits on top;
  - `ci` (float, 1.0 for emb/logit/delta nodes), `activation` (float), `influence` (float,
    optional), `label` (str) and `token` (the prompt token at `pos`, str);
  - logits also carry `prob` (probability under the target model) and `token_id`, and may carry
    `logit_token` (the decoded text of that token).
- Edge attributes: `weight` (signed float) and `cross_position` (bool).
- Graph attributes (`G.graph`): `prompt` (str), `prompt_tokens` (list[str]), `target_pos` (int),
  `target_token` (str), `report` (dict: name → float, e.g. P(target) under the target, CI,
  stochastic and adversarial masks), `qk_pairs` (list of dicts with keys `o_node`, `q_node`,
  `k_node`, `key_pos`, `strength`) and `settings` (dict; from `attribute_prompt`, the
  `GraphSettings` fields, plus `optimize_settings` after a per-prompt optimisation). Graphs from
  `attribute_prompt` also carry `target_token_id` (int); their nodes all have `influence`.

Every attribute must be JSON-native (str, int, float, bool, None, lists and str-keyed dicts) for
the node-link round trip to be exact. No function here mutates its input graph.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx

from decomposer.errors import ArtifactFormatError, VpdError
from decomposer.io import atomic_write_json

NODE_LINK_FORMAT = "attribution_graph_node_link"
NODE_LINK_FORMAT_VERSION = 1
CIRCUIT_TRACER_SCHEMA_VERSION = 1

# The frontends treat a feature_type containing "error" as an error node (the share of a node's input
# that comes from outside the replacement); δ is the decomposition's counterpart.
_FEATURE_TYPES = {"comp": "vpd subcomponent", "delta": "vpd delta error", "emb": "embedding", "logit": "logit"}


def to_node_link(G: nx.DiGraph) -> dict[str, Any]:
    """The node-link form of `G`, with edges under the key "edges".

    Args:
        G: An attribution graph (see the module docstring).

    Returns:
        A JSON-ready dict that shares no mutable object with `G`.
    """
    # node_link_data hands back G.graph itself and the attribute values unchanged; a deep copy keeps
    # edits to the result from reaching the graph.
    return copy.deepcopy(nx.node_link_data(G, edges="edges"))


def from_node_link(data: Mapping[str, Any]) -> nx.DiGraph:
    """Rebuild the graph written by `to_node_link`; the exact inverse, also after a JSON round trip.

    Args:
        data: A node-link dict with edges under "edges".

    Returns:
        A new `nx.DiGraph` that shares no mutable object with `data`.

    Raises:
        VpdError: If `data` is not a directed, non-multigraph node-link dict with an "edges" key.
    """
    if not isinstance(data, Mapping) or "nodes" not in data:
        raise VpdError(f"`data` must be a node-link dict with 'nodes' and 'edges'; got {type(data).__name__}.")
    if "edges" not in data:
        found = "'links'" if "links" in data else "no edge list"
        raise VpdError(f"`data` has {found} but no 'edges' key. Write it with `to_node_link(graph)`.")
    if data.get("directed") is False or data.get("multigraph") is True:
        raise VpdError(
            f"`data` describes a graph with directed={data.get('directed')} and multigraph="
            f"{data.get('multigraph')}; attribution graphs are directed simple graphs (nx.DiGraph)."
        )
    return nx.node_link_graph(copy.deepcopy(dict(data)), directed=True, multigraph=False, edges="edges")


def save_graph_json(G: nx.DiGraph, path: str | Path) -> Path:
    """Write `G` as node-link JSON, atomically, with a format header that `load_graph_json` checks.

    Args:
        G: An attribution graph (see the module docstring).
        path: The file to write; its folder is created if needed.

    Returns:
        The path written.
    """
    header = {"format": NODE_LINK_FORMAT, "format_version": NODE_LINK_FORMAT_VERSION}
    return atomic_write_json(path, {**header, **to_node_link(G)})


def load_graph_json(path: str | Path) -> nx.DiGraph:
    """Read a graph written by `save_graph_json`.

    Args:
        path: A file written by `save_graph_json`.

    Returns:
        The graph, equal to the one saved in nodes, edges and every attribute.

    Raises:
        ArtifactFormatError: If the file is not a node-link graph of a version this release reads.
        VpdError: If the node-link content itself is malformed.
    """
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != NODE_LINK_FORMAT:
        raise ArtifactFormatError(
            f"{path.name} has format {fmt!r}, not {NODE_LINK_FORMAT!r}. Write it with `save_graph_json(graph, path)`."
        )
    version = data.get("format_version")
    if version != NODE_LINK_FORMAT_VERSION:
        raise ArtifactFormatError(
            f"{path.name} has format_version {version!r}, but this release reads version "
            f"{NODE_LINK_FORMAT_VERSION}. Upgrade the package or re-export the graph."
        )
    body = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    return from_node_link(body)


def _attr(G: nx.DiGraph, node: str, name: str) -> Any:
    attrs = G.nodes[node]
    if name not in attrs:
        raise VpdError(f"Node {node!r} has no `{name}` attribute; see attrgraph.export for the graph convention.")
    return attrs[name]


def _module_layout(
    G: nx.DiGraph, module_sizes: Mapping[str, int] | None
) -> tuple[list[str], dict[str, int], dict[str, int]]:
    """Module order, sizes (C per module) and flat-index offsets for the `feature` field."""
    used: dict[str, int] = {}  # module -> its grid row, for ordering
    max_index: dict[str, int] = {}
    for n, attrs in G.nodes(data=True):
        if _attr(G, n, "kind") in ("comp", "delta"):
            module = _attr(G, n, "module")
            used.setdefault(module, _attr(G, n, "row"))
            if attrs["kind"] == "comp":
                max_index[module] = max(max_index.get(module, -1), _attr(G, n, "index"))
    if module_sizes is None:
        # Without the decomposition at hand, C is inferred from the graph: feature numbers are then
        # stable within this export only, which the recorded module_sizes makes explicit.
        order = sorted(used, key=lambda m: (used[m], m))
        sizes = {m: max_index.get(m, -1) + 1 for m in order}
    else:
        order = list(module_sizes)
        sizes = {m: int(module_sizes[m]) for m in order}
        missing = sorted(set(used) - set(sizes))
        if missing:
            raise VpdError(
                f"`module_sizes` has no entry for module {missing[0]!r}; give C for every module in the graph."
            )
        for m, top in max_index.items():
            if top >= sizes[m]:
                raise VpdError(f"`module_sizes[{m!r}]`={sizes[m]} but the graph has subcomponent index {top}.")
    offsets, total = {}, 0
    for m in order:
        offsets[m] = total
        total += sizes[m]
    return order, sizes, offsets


def _target_logit(G: nx.DiGraph) -> str | None:
    """The logit node of the label y*: by `target_token_id` if recorded, else the most likely at t*."""
    target_pos = G.graph.get("target_pos")
    logits = [n for n, a in G.nodes(data=True) if a.get("kind") == "logit" and a.get("pos") == target_pos]
    if not logits:
        return None
    flagged = [n for n in logits if G.nodes[n].get("is_target") is True]
    if flagged:
        return flagged[0]
    token_id = G.graph.get("target_token_id")
    if token_id is not None:
        matches = [n for n in logits if G.nodes[n].get("token_id", G.nodes[n].get("index")) == token_id]
        return matches[0] if matches else None
    return max(logits, key=lambda n: (G.nodes[n].get("prob", -math.inf), n))


def _logit_text(G: nx.DiGraph, node: str, target: str | None) -> str:
    """The decoded token of a logit node: `logit_token`, else the graph's target token, else its id."""
    attrs = G.nodes[node]
    if attrs.get("logit_token") is not None:
        return str(attrs["logit_token"])
    if node == target and G.graph.get("target_token") is not None:
        return str(G.graph["target_token"])
    return f"token {attrs.get('token_id', attrs.get('index'))}"


def _cumulative_influence(G: nx.DiGraph) -> dict[str, float]:
    """Each node's cumulative share of the graph's influence, taken in descending order of influence.

    circuit-tracer's graph files carry this in `influence` (not the raw value): its frontend's pruning
    slider keeps the nodes whose share is at most the slider's value. Nodes without an `influence`
    attribute get none.
    """
    scored = [(float(a["influence"]), n) for n, a in G.nodes(data=True) if a.get("influence") is not None]
    total = sum(max(v, 0.0) for v, _ in scored)
    shares, running = {}, 0.0
    for value, n in sorted(scored, key=lambda item: (-item[0], item[1])):
        running += max(value, 0.0)
        shares[n] = running / total if total > 0 else 1.0
    return shares


def to_circuit_tracer(
    G: nx.DiGraph,
    *,
    slug: str,
    node_threshold: float | None = None,
    scan: str | None = None,
    module_sizes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The graph as a circuit-tracer / Neuronpedia graph file (schema version 1).

    The result validates against circuit-tracer's own file model (`circuit_tracer.frontend.graph_models.Model`,
    checked by `benchmarks/peers/validate_export.py`). Node ids copy circuit-tracer's patterns so that
    the stock frontends parse them: subcomponents
    `{row}_{feature}_{pos}`, embeddings `E_{token_id}_{pos}`, logits `{row}_{token_id}_{pos}` and
    deltas (our error nodes) `{row}_delta{m}_{pos}` with m the module's place in the module order.
    Each node also carries `vpd_node_id`, its canonical id in `G`. `feature` is a global flat
    subcomponent index: the offset of the module (sum of C over earlier modules in
    `metadata.info.module_order`) plus c.

    As in circuit-tracer's files, a logit's `clerp` is `Output "{token}" (p={prob:.3f})` (the frontend
    reads the probability after "(p="), and `influence` is the node's cumulative share of the graph's
    influence in descending order (its pruning slider compares that share); the raw influence stays in
    `vpd_influence`. `metadata.transcoder_list` is empty, as circuit-tracer writes it for a single scan.

    Args:
        G: An attribution graph (see the module docstring).
        slug: A short name for the graph, used by the frontends in URLs.
        node_threshold: The node threshold the graph was pruned with, recorded in `metadata` only.
        scan: The model name for `metadata.scan`; defaults to `settings["model"]`, else "vpd".
        module_sizes: C per module, in module order. Pass it (from the decomposition) so `feature`
            numbers agree across graphs; without it the order is by grid row then name and C is
            inferred as the largest index in the graph plus one.

    Returns:
        A JSON-ready dict with keys `metadata`, `qParams`, `nodes` and `links`.

    Raises:
        VpdError: If `node_threshold` is outside [0, 1], a node lacks a required attribute, or
            `module_sizes` misses a module or is too small for an index.
    """
    if node_threshold is not None and not 0.0 <= node_threshold <= 1.0:
        raise VpdError(f"`node_threshold` must be in [0, 1]; got {node_threshold}. Pass a fraction such as 0.8.")
    settings = copy.deepcopy(G.graph.get("settings", {}))
    order, sizes, offsets = _module_layout(G, module_sizes)
    target = _target_logit(G)
    shares = _cumulative_influence(G)
    ids: dict[str, str] = {}
    nodes: list[dict[str, Any]] = []
    for n, attrs in G.nodes(data=True):
        kind, pos, row = _attr(G, n, "kind"), _attr(G, n, "pos"), _attr(G, n, "row")
        if kind == "comp":
            feature = offsets[attrs["module"]] + _attr(G, n, "index")
            node_id, js_id = f"{row}_{feature}_{pos}", f"{row}_{feature}-0"
        elif kind == "delta":
            m = order.index(attrs["module"])
            feature, node_id, js_id = -1, f"{row}_delta{m}_{pos}", f"{row}_delta{m}_{pos}-0"
        elif kind == "emb":
            vocab = attrs.get("token_id", attrs.get("index"))
            vocab = -1 if vocab is None else vocab
            feature, node_id, js_id = pos, f"E_{vocab}_{pos}", f"E_{vocab}-{pos}"
        elif kind == "logit":
            vocab = attrs.get("token_id", attrs.get("index"))
            feature, node_id, js_id = vocab, f"{row}_{vocab}_{pos}", f"L_{vocab}-{pos}"
        else:
            raise VpdError(f"Node {n!r} has `kind`={kind!r}; expected one of comp, emb, logit, delta.")
        ids[n] = node_id
        prob = float(attrs.get("prob", 0.0)) if kind == "logit" else 0.0
        label = f'Output "{_logit_text(G, n, target)}" (p={prob:.3f})' if kind == "logit" else attrs.get("label", n)
        nodes.append(
            {
                "node_id": node_id,
                "jsNodeId": js_id,
                "feature": feature,
                "layer": "E" if kind == "emb" else str(row),
                "ctx_idx": pos,
                "feature_type": _FEATURE_TYPES[kind],
                "token_prob": prob,
                "is_target_logit": n == target,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "clerp": str(label),
                "influence": shares.get(n),
                "vpd_influence": attrs.get("influence"),
                "activation": attrs.get("activation"),
                "ci": attrs.get("ci"),
                "vpd_node_id": n,
            }
        )
    assert len(set(ids.values())) == len(ids), "circuit-tracer node ids must be unique"
    links = [
        {"source": ids[u], "target": ids[v], "weight": float(w)} for u, v, w in G.edges(data="weight", default=0.0)
    ]
    metadata = {
        "slug": slug,
        "scan": scan if scan is not None else str(settings.get("model", "vpd")),
        "prompt": G.graph.get("prompt", ""),
        "transcoder_list": [],
        "prompt_tokens": list(G.graph.get("prompt_tokens", [])),
        "node_threshold": node_threshold,
        "schema_version": CIRCUIT_TRACER_SCHEMA_VERSION,
        "info": {
            "settings": settings,
            "report": copy.deepcopy(G.graph.get("report", {})),
            "target_pos": G.graph.get("target_pos"),
            "target_token": G.graph.get("target_token"),
            "module_order": order,
            "module_sizes": sizes,
            "qk_pairs": copy.deepcopy(G.graph.get("qk_pairs", [])),
        },
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}

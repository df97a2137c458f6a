"""Influence pruning of attribution graphs (circuit-tracer semantics) on COO edges, and simple graph filters.

Orientation, stated once: edges run from `sources[e]` to `targets[e]` over node indices (for networkx graphs,
the i-th node of `list(G.nodes)`), i.e. the entries A[target, source] of the adjacency, as in circuit-tracer.
The maths is in docs/attribution-graphs.md, "Influence pruning"; `prune_coo` runs its steps:

1. Â: each edge's |weight| divided by the |weight| sum of its target's inputs (`coo_normalized_abs`).
2. w: each logit node's probability, zero elsewhere; influence = w(Â + Â² + …) (`coo_series`, one
   scatter-add over the edges per product; the graph is a DAG, so it ends; 1000 products is a cycle).
3. Keep the highest-influence nodes up to a cumulative `node_threshold` share; embeddings and logits always.
4. Zero the edges touching a dropped node, renormalise.
5. Score each edge as Â[t, s] · (influence_t + w_t) on the pruned Â; keep up to a cumulative `edge_threshold`.
6. Drop dangling nodes until nothing changes (`drop_dangling`): comp and delta nodes with no kept outgoing
   edge, comp nodes with no kept incoming edge.
7. Return masks; the networkx wrappers (`prune_graph`, `remove_dangling`, `ci_threshold`) build new graphs.

O(edges · depth) time and O(nodes + edges) memory; `attrgraph.reference.influence_prune` states the same steps
on a dense A and is what the tests compare this against. `graph_influence` is step 2 on a networkx graph.

"Until the cumulative share reaches x" includes the item that crosses x, and every item tied with
it. At least the single highest-scoring item is kept, and items scoring exactly 0 never are.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import networkx as nx
import torch
from torch import Tensor

from attrgraph.nodes import KINDS
from attrgraph.settings import DEFAULTS
from decomposer.errors import VpdError

MAX_PRODUCTS = 1000


def check_threshold(name: str, value: float) -> None:
    """Refuse a share outside [0, 1], naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise VpdError(f"`{name}` must be in [0, 1]; got {value!r}. Pass a fraction such as 0.8.")


def cutoff(scores: Tensor, threshold: float) -> Tensor:
    """The smallest score kept when keeping the top scores up to a cumulative `threshold` share."""
    ranked = torch.sort(scores.flatten(), descending=True).values
    n_positive = int((ranked > 0).sum())
    if n_positive == 0:
        return torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    share = torch.cumsum(ranked, dim=0) / ranked.sum()
    i = int(torch.searchsorted(share, torch.tensor([threshold], dtype=share.dtype, device=share.device)).item())
    # Rounding can leave the last share just under 1.0; never fall through to a zero score.
    return ranked[min(i, n_positive - 1)]


def kind_masks(kinds: Sequence[str], n: int) -> dict[str, Tensor]:
    """Kind → bool (n,) mask from a per-node list of kinds (each one of `KINDS`)."""
    if len(kinds) != n:
        raise VpdError(f"`kinds` must have one entry per node of `A` ({n}); got {len(kinds)}.")
    bad = sorted({str(k) for k in kinds if k not in KINDS})
    if bad:
        raise VpdError(f"`kinds` holds {', '.join(bad[:5])}; each entry must be one of {', '.join(KINDS)}.")
    return {k: torch.tensor([kind == k for kind in kinds], dtype=torch.bool) for k in KINDS}


class CooPruneMasks(NamedTuple):
    """What `prune_coo` keeps.

    Attributes:
        node_mask: Bool (n,), True for kept nodes.
        edge_mask: Bool (nnz,), True for kept edges, aligned with the input edge list.
        influence: (n,) influence of every node on the logits in the unpruned graph.
    """

    node_mask: Tensor
    edge_mask: Tensor
    influence: Tensor


def coo_normalized_abs(n: int, targets: Tensor, weights: Tensor) -> Tensor:
    """|w| of each edge divided by the |w| sum of its target's inputs (step 1); targets without inputs stay zero."""
    magnitude = weights.abs()
    row_sums = torch.zeros(n, dtype=magnitude.dtype, device=magnitude.device).index_add_(0, targets, magnitude)
    return magnitude / torch.where(row_sums > 0, row_sums, torch.ones_like(row_sums))[targets]


def coo_series(n: int, targets: Tensor, sources: Tensor, a_hat: Tensor, w: Tensor) -> Tensor:
    """w(Â + Â² + …) with Â given as COO edges; one scatter-add over the edges per product.

    Raises:
        VpdError: If the series has not ended after `MAX_PRODUCTS` products (a cycle).
    """
    term = torch.zeros(n, dtype=a_hat.dtype, device=a_hat.device).index_add_(0, sources, a_hat * w[targets])
    total = term.clone()
    products = 1
    while bool(term.any()):
        if products >= MAX_PRODUCTS:
            raise VpdError(
                f"Influence did not vanish after {MAX_PRODUCTS} products, so the graph has a cycle; "
                "an attribution graph must be a DAG (check the edge orientation: targets, then sources)."
            )
        term = torch.zeros_like(term).index_add_(0, sources, a_hat * term[targets])
        total += term
        products += 1
    return total


def prune_coo(
    n: int,
    targets: Tensor,
    sources: Tensor,
    weights: Tensor,
    kinds: Sequence[str] | dict[str, Tensor],
    logit_weights: Tensor,
    *,
    node_threshold: float = DEFAULTS.node_threshold,
    edge_threshold: float = DEFAULTS.edge_threshold,
) -> CooPruneMasks:
    """Influence pruning (steps 1–7 of the module docstring) of a graph given as COO edges.

    Args:
        n: Number of nodes.
        targets: (nnz,) target node of each edge.
        sources: (nnz,) source node of each edge; no (target, source) pair may repeat.
        weights: (nnz,) signed edge weights; computed in float64 whatever their dtype.
        kinds: Per node "comp", "emb", "logit" or "delta", or kind → bool (n,) mask.
        logit_weights: (n,) probability at each logit node, zero elsewhere.
        node_threshold: Cumulative influence share of the nodes to keep, in [0, 1].
        edge_threshold: Cumulative score share of the edges to keep, in [0, 1].

    Returns:
        Node mask, edge mask (aligned with the edges) and the unpruned influence.

    Raises:
        VpdError: A threshold outside [0, 1], misaligned inputs, non-finite weights, or a cycle.
    """
    check_threshold("node_threshold", node_threshold)
    check_threshold("edge_threshold", edge_threshold)
    if not (targets.shape == sources.shape == weights.shape) or targets.ndim != 1:
        raise VpdError(
            f"`targets`, `sources` and `weights` must be 1-D and of one length; got {tuple(targets.shape)}, "
            f"{tuple(sources.shape)} and {tuple(weights.shape)}."
        )
    if tuple(logit_weights.shape) != (n,):
        raise VpdError(f"`logit_weights` must have shape ({n},), one entry per node; got {tuple(logit_weights.shape)}.")
    device = weights.device
    masks = kinds if isinstance(kinds, dict) else kind_masks(kinds, n)
    masks = {k: masks[k].to(device) for k in KINDS}
    weights = weights.detach().to(torch.float64)
    if not bool(torch.isfinite(weights).all()):
        raise VpdError("`weights` contains NaN or infinite entries; every edge weight must be finite.")
    targets, sources = targets.to(device), sources.to(device)
    w = logit_weights.detach().to(device, torch.float64)

    a_hat = coo_normalized_abs(n, targets, weights)
    node_influence = coo_series(n, targets, sources, a_hat, w)
    node_mask = node_influence >= cutoff(node_influence, node_threshold)
    node_mask |= masks["emb"] | masks["logit"]

    # Step 4: edges touching a dropped node are zeroed, then the rows renormalised.
    inside = node_mask[targets] & node_mask[sources]
    pruned_hat = coo_normalized_abs(n, targets, torch.where(inside, weights, torch.zeros_like(weights)))
    edge_scores = pruned_hat * (coo_series(n, targets, sources, pruned_hat, w) + w)[targets]
    edge_mask = (edge_scores >= cutoff(edge_scores, edge_threshold)) & (pruned_hat > 0)

    drop_dangling(node_mask, edge_mask, targets, sources, masks["comp"], masks["delta"])
    return CooPruneMasks(node_mask, edge_mask, node_influence)


def drop_dangling(
    node_mask: Tensor, edge_mask: Tensor, targets: Tensor, sources: Tensor, is_comp: Tensor, is_delta: Tensor
) -> None:
    """Step 6, in place on the masks: until nothing changes, drop comp and delta nodes without a kept outgoing
    edge and comp nodes without a kept incoming one (and the edges touching dropped nodes)."""
    n = node_mask.numel()
    while True:
        edge_mask &= node_mask[targets] & node_mask[sources]
        has_out = torch.zeros(n, dtype=torch.bool, device=node_mask.device).index_fill_(0, sources[edge_mask], True)
        has_in = torch.zeros(n, dtype=torch.bool, device=node_mask.device).index_fill_(0, targets[edge_mask], True)
        keep = node_mask & ~((is_comp | is_delta) & ~has_out) & ~(is_comp & ~has_in)
        if torch.equal(keep, node_mask):
            return
        node_mask &= keep


def _check_digraph(G: nx.DiGraph) -> None:
    if not isinstance(G, nx.DiGraph) or G.is_multigraph():
        raise VpdError(f"`G` must be a networkx DiGraph (not a multigraph); got {type(G).__name__}.")


def _node_attr(G: nx.DiGraph, node: Hashable, name: str) -> Any:
    if name not in G.nodes[node]:
        raise VpdError(f"Node {node!r} of `G` has no {name!r} attribute; every node needs one for pruning.")
    return G.nodes[node][name]


def _with(G: nx.DiGraph, nodes: Sequence[Hashable], edges: Sequence[tuple[Hashable, Hashable]]) -> nx.DiGraph:
    """A new graph with G's graph attributes and the given nodes and edges, their attribute dicts copied."""
    H = G.__class__()
    H.graph.update(G.graph)
    H.add_nodes_from((v, dict(G.nodes[v])) for v in nodes)
    H.add_edges_from((u, v, dict(G.edges[u, v])) for u, v in edges)
    return H


class _Coo(NamedTuple):
    """A networkx graph as the COO form `prune_coo` reads: nodes in `list(G.nodes)` order, edges in `G.edges` order."""

    nodes: list[Hashable]
    edges: list[tuple[Hashable, Hashable]]
    masks: dict[str, Tensor]
    targets: Tensor
    sources: Tensor


def _coo(G: nx.DiGraph) -> _Coo:
    _check_digraph(G)
    nodes = list(G.nodes)
    position = {v: i for i, v in enumerate(nodes)}
    masks = kind_masks([str(_node_attr(G, v, "kind")) for v in nodes], len(nodes))
    edges = list(G.edges)
    targets = torch.tensor([position[v] for _, v in edges], dtype=torch.long)
    sources = torch.tensor([position[u] for u, _ in edges], dtype=torch.long)
    return _Coo(nodes, edges, masks, targets, sources)


def _weights(G: nx.DiGraph, edges: list[tuple[Hashable, Hashable]], weight: str) -> Tensor:
    for u, v in edges:
        if weight not in G.edges[u, v]:
            raise VpdError(f"Edge ({u!r}, {v!r}) of `G` has no {weight!r} attribute; check the `weight` argument.")
    return torch.tensor([float(G.edges[e][weight]) for e in edges], dtype=torch.float64)


def prune_graph(
    G: nx.DiGraph,
    *,
    node_threshold: float = DEFAULTS.node_threshold,
    edge_threshold: float = DEFAULTS.edge_threshold,
    weight: str = "weight",
) -> nx.DiGraph:
    """Influence-prune a networkx graph; `prune_coo` on its edge list.

    Args:
        G: Graph whose nodes have a `kind` attribute and whose logit nodes have a `prob` attribute.
        node_threshold: Cumulative influence share of the nodes to keep, in [0, 1].
        edge_threshold: Cumulative score share of the edges to keep, in [0, 1].
        weight: Name of the signed edge-weight attribute.

    Returns:
        A new graph with the kept nodes and edges; each kept node gains an `influence` attribute.
        `G` is not modified.

    Raises:
        VpdError: If `G` is not a DiGraph, an attribute is missing, a threshold is outside [0, 1], or G has a cycle.
    """
    check_threshold("node_threshold", node_threshold)
    check_threshold("edge_threshold", edge_threshold)
    coo = _coo(G)
    logit_weights = torch.zeros(len(coo.nodes), dtype=torch.float64)
    for i in coo.masks["logit"].nonzero().squeeze(1).tolist():
        logit_weights[i] = float(_node_attr(G, coo.nodes[i], "prob"))
    result = prune_coo(
        len(coo.nodes),
        coo.targets,
        coo.sources,
        _weights(G, coo.edges, weight),
        coo.masks,
        logit_weights,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    kept = [v for v, keep in zip(coo.nodes, result.node_mask.tolist(), strict=True) if keep]
    H = _with(G, kept, [e for e, keep in zip(coo.edges, result.edge_mask.tolist(), strict=True) if keep])
    for i, keep in enumerate(result.node_mask.tolist()):
        if keep:
            H.nodes[coo.nodes[i]]["influence"] = float(result.influence[i])
    return H


def graph_influence(G: nx.DiGraph, weight: str = "weight") -> dict[Hashable, float]:
    """Each node's influence on the logits (step 2) for a networkx graph whose nodes carry none.

    The logits weigh in with their `prob` (1 where missing), normalised to sum to one; non-finite weights
    count as 0.

    Raises:
        VpdError: If `G` is not a DiGraph, a node has no `kind`, or G has a cycle.
    """
    coo = _coo(G)
    w = torch.zeros(len(coo.nodes), dtype=torch.float64)
    for i in coo.masks["logit"].nonzero().squeeze(1).tolist():
        prob = G.nodes[coo.nodes[i]].get("prob", 1.0)
        w[i] = max(float(prob), 0.0) if isinstance(prob, int | float) and math.isfinite(prob) else 0.0
    w = w / (w.sum() if w.sum() > 0 else max(int(coo.masks["logit"].sum()), 1))
    weights = torch.tensor([float(G.edges[e].get(weight, 0.0) or 0.0) for e in coo.edges], dtype=torch.float64)
    weights = torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))
    n = len(coo.nodes)
    series = coo_series(n, coo.targets, coo.sources, coo_normalized_abs(n, coo.targets, weights), w)
    return dict(zip(coo.nodes, series.tolist(), strict=True))


def remove_dangling(G: nx.DiGraph) -> nx.DiGraph:
    """Drop, until nothing changes, comp and delta nodes without outgoing edges and comp nodes without incoming ones.

    Returns:
        A new graph; `G` is not modified.

    Raises:
        VpdError: If `G` is not a DiGraph or a node has no `kind` attribute.
    """
    coo = _coo(G)
    node_mask = torch.ones(len(coo.nodes), dtype=torch.bool)
    edge_mask = torch.ones(len(coo.edges), dtype=torch.bool)
    drop_dangling(node_mask, edge_mask, coo.targets, coo.sources, coo.masks["comp"], coo.masks["delta"])
    keep = node_mask.tolist()
    edges = [e for e, k in zip(coo.edges, edge_mask.tolist(), strict=True) if k]
    return _with(G, [v for v, k in zip(coo.nodes, keep, strict=True) if k], edges)


def ci_threshold(G: nx.DiGraph, tau: float) -> nx.DiGraph:
    """Drop comp nodes with `ci` ≤ `tau`, then the nodes this leaves dangling (see `remove_dangling`).

    Raises:
        VpdError: If `tau` is outside [0, 1], `G` is not a DiGraph, or a comp node has no `ci` attribute.
    """
    _check_digraph(G)
    check_threshold("tau", tau)
    keep = [v for v in G.nodes if _node_attr(G, v, "kind") != "comp" or float(_node_attr(G, v, "ci")) > tau]
    kept = set(keep)
    return remove_dangling(_with(G, keep, [(u, v) for u, v in G.edges if u in kept and v in kept]))


def top_k_edges(G: nx.DiGraph, k: int, weight: str = "weight") -> nx.DiGraph:
    """Keep the `k` edges of largest |weight| (earlier edges win ties) and every node.

    Nodes left without edges stay; chain `remove_dangling` to drop them.

    Raises:
        VpdError: If `k` is not an int >= 0, `G` is not a DiGraph, or an edge has no `weight` attribute.
    """
    _check_digraph(G)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise VpdError(f"`k` must be an int >= 0; got {k!r}.")
    edges = list(G.edges(data=True))
    for u, v, data in edges:
        if weight not in data:
            raise VpdError(f"Edge ({u!r}, {v!r}) of `G` has no {weight!r} attribute; check the `weight` argument.")
    # sorted() is stable, so equal magnitudes keep G's edge order and the result is deterministic.
    ranked = sorted(range(len(edges)), key=lambda i: -abs(float(edges[i][2][weight])))
    chosen = sorted(ranked[:k])
    return _with(G, list(G.nodes), [(edges[i][0], edges[i][1]) for i in chosen])

"""Influence pruning of attribution graphs (circuit-tracer semantics) and simple graph filters.

Node order and orientation, stated once for the whole module: node i is the i-th entry of the
`nodes` (or `kinds`) list, and for networkx graphs the i-th node of `list(G.nodes)`. The dense
adjacency A has shape (n, n) and A[target, source] is the signed edge weight from source to target,
as in circuit-tracer. So row t lists the inputs of t and column s the outputs of s.

`influence_prune` follows attribution-graphs.md §6:

1. Â = |A| with each target row normalised to sum to 1.
2. w is zero except at logit nodes, where it holds their probabilities; the influence of node j is
   [w(Â + Â² + …)]_j. The graph is a DAG, so the series ends; 1000 products without ending is a cycle.
3. Keep the highest-influence nodes until their cumulative share reaches `node_threshold`.
   Embeddings and logits are always kept.
4. Zero the dropped rows and columns of A, then renormalise.
5. Score each edge as Â[t, s] · (influence_t + w_t), with the influence recomputed on the pruned Â
   (as circuit-tracer does), and keep edges up to a cumulative `edge_threshold`.
6. Repeatedly drop comp and delta nodes with no kept outgoing edge, and comp nodes with no kept
   incoming edge, until nothing changes.
7. Return masks; the graph is left alone. The networkx wrappers build new graphs from the masks.

`prune_coo` runs the same steps on a graph held as COO edges (target, source, weight), in O(edges ·
depth) time and O(nodes + edges) memory: no dense matrix and no sort beyond the nonzero edges. It is
what `attribute_prompt` and `prune_graph` use; `influence_prune` states the algorithm on a dense A and
is kept as the reference the COO form is tested against.

"Until the cumulative share reaches x" includes the item that crosses x, and every item tied with
it. At least the single highest-scoring item is kept, and items scoring exactly 0 never are.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import networkx as nx
import torch
from torch import Tensor

from decomposer.errors import VpdError

MAX_PRODUCTS = 1000
_KINDS = ("comp", "emb", "logit", "delta")


class PruneMasks(NamedTuple):
    """What `influence_prune` keeps, in the module's node order.

    Attributes:
        node_mask: Bool (n,), True for kept nodes.
        edge_mask: Bool (n, n) in the A[target, source] orientation, True for kept edges; only
            nonzero edges between kept nodes are ever True.
        influence: (n,) influence of every node on the logits in the unpruned graph (step 2).
    """

    node_mask: Tensor
    edge_mask: Tensor
    influence: Tensor


def _check_threshold(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise VpdError(f"`{name}` must be in [0, 1]; got {value!r}. Pass a fraction such as 0.8.")


def _check_square(A: Tensor) -> None:
    if not isinstance(A, Tensor) or A.ndim != 2 or A.shape[0] != A.shape[1] or not A.is_floating_point():
        got = f"shape {tuple(A.shape)}, dtype {A.dtype}" if isinstance(A, Tensor) else type(A).__name__
        raise VpdError(f"`A` must be a dense square float tensor A[target, source]; got {got}.")
    if not bool(torch.isfinite(A).all()):
        raise VpdError("`A` contains NaN or infinite entries; every edge weight must be finite.")


def normalized_abs(A: Tensor) -> Tensor:
    """|A| with each target row scaled to sum to 1; rows of zeros stay zero.

    Raises:
        VpdError: If `A` is not a square floating-point matrix.
    """
    _check_square(A)
    magnitude = A.abs()
    row_sums = magnitude.sum(dim=1, keepdim=True)
    # Dividing a zero row by 1 keeps it exactly zero instead of producing NaN.
    return magnitude / torch.where(row_sums > 0, row_sums, torch.ones_like(row_sums))


def _series(A_hat: Tensor, w: Tensor) -> Tensor:
    """w(Â + Â² + …) for an already normalised Â, stopping when a product is exactly zero."""
    term = w @ A_hat
    total = term.clone()
    products = 1
    while bool(term.any()):
        if products >= MAX_PRODUCTS:
            raise VpdError(
                f"Influence did not vanish after {MAX_PRODUCTS} products, so `A` has a cycle; "
                "an attribution graph must be a DAG (check the node order and the A[target, source] orientation)."
            )
        term = term @ A_hat
        total += term
        products += 1
    return total


def influence(A: Tensor, logit_weights: Tensor) -> Tensor:
    """Influence of every node on the weighted logits: w(Â + Â² + …) with Â = `normalized_abs(A)`.

    Args:
        A: Signed adjacency, A[target, source], shape (n, n).
        logit_weights: w, shape (n,): the probability at each logit node and zero elsewhere.

    Returns:
        Influence per node, shape (n,), in A's dtype. A logit's own weight is not included.

    Raises:
        VpdError: If the shapes disagree, or if the series has not ended after 1000 products (a cycle).
    """
    A_hat = normalized_abs(A)
    if not isinstance(logit_weights, Tensor) or tuple(logit_weights.shape) != (A.shape[0],):
        got = tuple(logit_weights.shape) if isinstance(logit_weights, Tensor) else type(logit_weights).__name__
        raise VpdError(f"`logit_weights` must have shape ({A.shape[0]},) to match `A`; got {got}.")
    return _series(A_hat, logit_weights.to(A.dtype))


def _cutoff(scores: Tensor, threshold: float) -> Tensor:
    """The smallest score kept when keeping the top scores up to a cumulative `threshold` share."""
    ranked = torch.sort(scores.flatten(), descending=True).values
    n_positive = int((ranked > 0).sum())
    if n_positive == 0:
        return torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    share = torch.cumsum(ranked, dim=0) / ranked.sum()
    i = int(torch.searchsorted(share, torch.tensor([threshold], dtype=share.dtype, device=share.device)).item())
    # Rounding can leave the last share just under 1.0; never fall through to a zero score.
    return ranked[min(i, n_positive - 1)]


def _drop_dangling(node_mask: Tensor, edge_mask: Tensor, is_comp: Tensor, is_delta: Tensor) -> None:
    """Step 6, in place on the masks: repeat until no comp/delta node lacks outputs or comp lacks inputs."""
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        has_out = edge_mask.any(dim=0)
        has_in = edge_mask.any(dim=1)
        keep = node_mask & ~((is_comp | is_delta) & ~has_out) & ~(is_comp & ~has_in)
        if torch.equal(keep, node_mask):
            return
        node_mask &= keep


def _kind_masks(kinds: Sequence[str], n: int) -> dict[str, Tensor]:
    if len(kinds) != n:
        raise VpdError(f"`kinds` must have one entry per node of `A` ({n}); got {len(kinds)}.")
    bad = sorted({str(k) for k in kinds if k not in _KINDS})
    if bad:
        raise VpdError(f"`kinds` holds {', '.join(bad[:5])}; each entry must be one of {', '.join(_KINDS)}.")
    return {k: torch.tensor([kind == k for kind in kinds], dtype=torch.bool) for k in _KINDS}


def influence_prune(
    A: Tensor,
    kinds: Sequence[str],
    logit_probs: Tensor,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneMasks:
    """Influence pruning, steps 1–7 of the module docstring.

    Args:
        A: Signed adjacency A[target, source], shape (n, n). Not modified.
        kinds: The kind of each node ("comp", "emb", "logit" or "delta"), length n.
        logit_probs: Probability of each logit node, in node order, shape (number of logits,).
        node_threshold: Cumulative influence share of the nodes to keep, in [0, 1].
        edge_threshold: Cumulative score share of the edges to keep, in [0, 1].

    Returns:
        The node and edge masks and the unpruned influence.

    Raises:
        VpdError: If a threshold is outside [0, 1], the shapes or kinds are invalid, or A has a cycle.
    """
    _check_threshold("node_threshold", node_threshold)
    _check_threshold("edge_threshold", edge_threshold)
    _check_square(A)
    n = A.shape[0]
    masks = _kind_masks(kinds, n)
    is_logit = masks["logit"]
    n_logits = int(is_logit.sum())
    if not isinstance(logit_probs, Tensor) or tuple(logit_probs.shape) != (n_logits,):
        got = tuple(logit_probs.shape) if isinstance(logit_probs, Tensor) else type(logit_probs).__name__
        raise VpdError(f"`logit_probs` must have shape ({n_logits},), one per logit node in `kinds`; got {got}.")
    A = A.detach()
    masks = {k: m.to(A.device) for k, m in masks.items()}
    is_logit = masks["logit"]
    w = torch.zeros(n, dtype=A.dtype, device=A.device)
    w[is_logit] = logit_probs.detach().to(A.device, A.dtype)

    node_influence = influence(A, w)
    node_mask = node_influence >= _cutoff(node_influence, node_threshold)
    node_mask |= masks["emb"] | is_logit

    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    pruned_hat = normalized_abs(pruned)
    edge_scores = pruned_hat * (_series(pruned_hat, w) + w)[:, None]
    edge_mask = (edge_scores >= _cutoff(edge_scores, edge_threshold)) & (pruned_hat > 0)

    _drop_dangling(node_mask, edge_mask, masks["comp"], masks["delta"])
    return PruneMasks(node_mask, edge_mask, node_influence)


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
    """|w| of each edge divided by the |w| sum of its target's row (`normalized_abs` on COO edges)."""
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
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
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
    _check_threshold("node_threshold", node_threshold)
    _check_threshold("edge_threshold", edge_threshold)
    if not (targets.shape == sources.shape == weights.shape) or targets.ndim != 1:
        raise VpdError(
            f"`targets`, `sources` and `weights` must be 1-D and of one length; got {tuple(targets.shape)}, "
            f"{tuple(sources.shape)} and {tuple(weights.shape)}."
        )
    if tuple(logit_weights.shape) != (n,):
        raise VpdError(f"`logit_weights` must have shape ({n},), one entry per node; got {tuple(logit_weights.shape)}.")
    device = weights.device
    masks = kinds if isinstance(kinds, dict) else _kind_masks(kinds, n)
    masks = {k: masks[k].to(device) for k in _KINDS}
    weights = weights.detach().to(torch.float64)
    if not bool(torch.isfinite(weights).all()):
        raise VpdError("`weights` contains NaN or infinite entries; every edge weight must be finite.")
    targets, sources = targets.to(device), sources.to(device)
    w = logit_weights.detach().to(device, torch.float64)

    a_hat = coo_normalized_abs(n, targets, weights)
    node_influence = coo_series(n, targets, sources, a_hat, w)
    node_mask = node_influence >= _cutoff(node_influence, node_threshold)
    node_mask |= masks["emb"] | masks["logit"]

    # Step 4: edges touching a dropped node are zeroed, then the rows renormalised.
    inside = node_mask[targets] & node_mask[sources]
    pruned_hat = coo_normalized_abs(n, targets, torch.where(inside, weights, torch.zeros_like(weights)))
    edge_scores = pruned_hat * (coo_series(n, targets, sources, pruned_hat, w) + w)[targets]
    edge_mask = (edge_scores >= _cutoff(edge_scores, edge_threshold)) & (pruned_hat > 0)

    is_comp, is_delta = masks["comp"], masks["delta"]
    while True:  # step 6
        edge_mask &= node_mask[targets] & node_mask[sources]
        has_out = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, sources[edge_mask], True)
        has_in = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, targets[edge_mask], True)
        keep = node_mask & ~((is_comp | is_delta) & ~has_out) & ~(is_comp & ~has_in)
        if torch.equal(keep, node_mask):
            break
        node_mask &= keep
    return CooPruneMasks(node_mask, edge_mask, node_influence)


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


def prune_graph(
    G: nx.DiGraph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98, weight: str = "weight"
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
    _check_digraph(G)
    _check_threshold("node_threshold", node_threshold)
    _check_threshold("edge_threshold", edge_threshold)
    nodes = list(G.nodes)
    position = {v: i for i, v in enumerate(nodes)}
    kinds = [str(_node_attr(G, v, "kind")) for v in nodes]
    logit_weights = torch.zeros(len(nodes), dtype=torch.float64)
    for i, (v, k) in enumerate(zip(nodes, kinds, strict=True)):
        if k == "logit":
            logit_weights[i] = float(_node_attr(G, v, "prob"))
    edges = list(G.edges(data=True))
    for u, v, data in edges:
        if weight not in data:
            raise VpdError(f"Edge ({u!r}, {v!r}) of `G` has no {weight!r} attribute; check the `weight` argument.")
    targets = torch.tensor([position[v] for _, v, _ in edges], dtype=torch.long)
    sources = torch.tensor([position[u] for u, _, _ in edges], dtype=torch.long)
    weights = torch.tensor([float(data[weight]) for *_, data in edges], dtype=torch.float64)
    result = prune_coo(
        len(nodes),
        targets,
        sources,
        weights,
        kinds,
        logit_weights,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
    )
    kept = [v for v, keep in zip(nodes, result.node_mask.tolist(), strict=True) if keep]
    H = _with(G, kept, [(u, v) for (u, v, _), keep in zip(edges, result.edge_mask.tolist(), strict=True) if keep])
    for v in kept:
        H.nodes[v]["influence"] = float(result.influence[position[v]])
    return H


def remove_dangling(G: nx.DiGraph) -> nx.DiGraph:
    """Drop, until nothing changes, comp and delta nodes without outgoing edges and comp nodes without incoming ones.

    Returns:
        A new graph; `G` is not modified.

    Raises:
        VpdError: If `G` is not a DiGraph or a node has no `kind` attribute.
    """
    _check_digraph(G)
    kinds = {v: _node_attr(G, v, "kind") for v in G.nodes}
    alive = set(G.nodes)
    changed = True
    while changed:
        dangling = {
            v
            for v in alive
            if (kinds[v] in ("comp", "delta") and not any(s in alive for s in G.successors(v)))
            or (kinds[v] == "comp" and not any(p in alive for p in G.predecessors(v)))
        }
        alive -= dangling
        changed = bool(dangling)
    return _with(G, [v for v in G.nodes if v in alive], [(u, v) for u, v in G.edges if u in alive and v in alive])


def ci_threshold(G: nx.DiGraph, tau: float) -> nx.DiGraph:
    """Drop comp nodes with `ci` ≤ `tau`, then the nodes this leaves dangling (see `remove_dangling`).

    Raises:
        VpdError: If `tau` is outside [0, 1], `G` is not a DiGraph, or a comp node has no `ci` attribute.
    """
    _check_digraph(G)
    _check_threshold("tau", tau)
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

"""An attribution graph with each (cluster, position) of subcomponents collapsed into one node."""

from __future__ import annotations

from collections.abc import Mapping

import networkx as nx

from attrgraph.labels import component_key
from attrgraph.nodes import NodeId
from decomposer.errors import VpdError


def _group_of(G: nx.DiGraph, node: object, mapping: Mapping[str, int]) -> tuple[object, int | None]:
    """(group node id, cluster id or None) of one node of an attribution graph."""
    if G.nodes[node].get("kind") != "comp":
        return node, None
    comp = NodeId.parse(str(node))
    assert comp.module is not None and comp.index is not None, f"comp node without module or index: {node!r}"
    label = mapping.get(component_key(comp.module, comp.index))
    return (node, None) if label is None else (f"cluster/{label}@{comp.pos}", label)


def group_graph(G: nx.DiGraph, mapping: Mapping[str, int], *, weight: str = "weight") -> nx.DiGraph:
    """Collapse each (cluster, position) of an attribution graph into one node, summing edge weights.

    Subcomponent nodes whose key (`1.attn.q:31`) is in `mapping` become `cluster/{id}@{t}` nodes with
    attributes kind "cluster", cluster, pos, members (the original node ids), ci (the members' largest CI),
    internal_weight (the summed weight of edges between members, which are dropped) and label. Every other
    node, and subcomponents outside `mapping`, are kept with their attributes. The weight of an edge
    between two groups is the sum over the edges between their members. With clusters that span matrices
    the result may have cycles.

    Args:
        G: An attribution graph (`PromptGraph.pruned`, or any graph in the `attrgraph.export` convention); not modified.
        mapping: Component key → cluster id, e.g. `Clustering.mapping` or `load_clusters(...)["mapping"]`.
        weight: Name of the edge-weight attribute.

    Returns:
        A new DiGraph with G's graph attributes plus `grouped=True`.

    Raises:
        VpdError: If `G` is not a DiGraph or an edge has no `weight` attribute.
    """
    if not isinstance(G, nx.DiGraph) or G.is_multigraph():
        raise VpdError(f"`G` must be a networkx DiGraph; got {type(G).__name__}.")
    H = nx.DiGraph()
    H.graph.update(G.graph, grouped=True)
    group = {}
    for v, data in G.nodes(data=True):
        gid, label = _group_of(G, v, mapping)
        group[v] = gid
        if label is None:
            H.add_node(gid, **dict(data))
        elif gid not in H:
            H.add_node(
                gid,
                kind="cluster",
                cluster=label,
                pos=data.get("pos"),
                members=[v],
                ci=data.get("ci", 0.0),
                internal_weight=0.0,
                token=data.get("token"),
                label=f"cluster {label} @{data.get('pos')}",
            )
        else:
            H.nodes[gid]["members"].append(v)
            H.nodes[gid]["ci"] = max(H.nodes[gid]["ci"], data.get("ci", 0.0))
    for u, v, data in G.edges(data=True):
        if weight not in data:
            raise VpdError(f"Edge ({u!r}, {v!r}) of `G` has no {weight!r} attribute; check the `weight` argument.")
        gu, gv = group[u], group[v]
        w = float(data[weight])
        if gu == gv:
            H.nodes[gu]["internal_weight"] += w
        elif H.has_edge(gu, gv):
            H.edges[gu, gv][weight] += w
        else:
            H.add_edge(gu, gv, **{weight: w, "cross_position": H.nodes[gu].get("pos") != H.nodes[gv].get("pos")})
    for _, data in H.nodes(data=True):
        if data.get("kind") == "cluster":
            data["label"] += f" ({len(data['members'])} subcomponents)"
    return H

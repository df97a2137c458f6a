"""attrgraph: per-prompt attribution graphs between VPD subcomponents.

Node ids, pruning, export and rendering of graphs held as `networkx.DiGraph`s (conventions in
`attrgraph.export`). Public names load lazily so `import attrgraph` stays cheap.
"""

from __future__ import annotations

from decomposer.lazy import lazy_getattr

_EXPORTS = {
    "Attribution": "attrgraph.edges",
    "attribute": "attrgraph.edges",
    "attribute_reference": "attrgraph.edges",
    "build_graph": "attrgraph.graph",
    "optimize_ci": "attrgraph.optimize",
    "faithfulness": "attrgraph.optimize",
    "ComponentKey": "attrgraph.nodes",
    "NodeId": "attrgraph.nodes",
    "short_label": "attrgraph.nodes",
    "influence_prune": "attrgraph.prune",
    "prune_graph": "attrgraph.prune",
    "ci_threshold": "attrgraph.prune",
    "top_k_edges": "attrgraph.prune",
    "remove_dangling": "attrgraph.prune",
    "to_node_link": "attrgraph.export",
    "from_node_link": "attrgraph.export",
    "save_graph_json": "attrgraph.export",
    "load_graph_json": "attrgraph.export",
    "to_circuit_tracer": "attrgraph.export",
    "render_html": "attrgraph.render",
    "render_png": "attrgraph.render",
    "render_svg": "attrgraph.render",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("attrgraph", _EXPORTS)

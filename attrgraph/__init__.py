"""attrgraph: per-prompt attribution graphs between VPD subcomponents.

`attribute_prompt(d, tokenizer, prompt, settings=GraphSettings())` is the pipeline: it returns a
`PromptGraph` whose graph stays tensors (`EdgeTable`: node table and COO edges) until pruning, and whose
pruned graph is a `networkx.DiGraph` (conventions in `attrgraph.export`). Public names load lazily so
`import attrgraph` stays cheap.
"""

from __future__ import annotations

from decomposer.lazy import lazy_getattr

_EXPORTS = {
    "attribute_prompt": "attrgraph.pipeline",
    "PromptGraph": "attrgraph.pipeline",
    "GraphSettings": "attrgraph.settings",
    "graph_settings": "attrgraph.settings",
    "OptimizeSettings": "attrgraph.settings",
    "optimize_settings": "attrgraph.settings",
    "EdgeTable": "attrgraph.edge_table",
    "attribute_edges": "attrgraph.edges",
    "save_full_graph": "attrgraph.artifact",
    "load_full_graph": "attrgraph.artifact",
    "prune_coo": "attrgraph.prune",
    "Attribution": "attrgraph.edge_table",
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

"""attrgraph: per-prompt attribution graphs between VPD subcomponents.

One path: `attribute_prompt(d, tokenizer, prompt, settings=GraphSettings())` returns a `PromptGraph`, whose
graph stays tensors (`EdgeTable`: node table and COO edges) until pruning and whose pruned graph is a
`networkx.DiGraph` (conventions in `attrgraph.export`); `PromptGraph.save` writes every file, and
`render_html`, `load_graph_json` and `load_full_graph` render and read them back. The phases are numbered
in `attrgraph.pipeline`'s docstring; the dense references the tests compare against live in
`attrgraph.reference`. Public names load lazily so `import attrgraph` stays cheap.
"""

from __future__ import annotations

from decomposer.lazy import lazy_getattr

_EXPORTS = {
    "attribute_prompt": "attrgraph.pipeline",
    "PromptGraph": "attrgraph.pipeline",
    "GraphSettings": "attrgraph.settings",
    "render_html": "attrgraph.render",
    "load_graph_json": "attrgraph.export",
    "load_full_graph": "attrgraph.artifact",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("attrgraph", _EXPORTS)

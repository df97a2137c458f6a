"""The full (unpruned) attribution graph on disk: safetensors for the tensors, JSON for the rest.

`save_full_graph(table, path, meta)` writes `path` (JSON metadata with a format version) and, next to it,
`path` with the suffix `.safetensors`: the node table (`kind`, `pos`, `module`, `index`, `activation`,
`ci`, `influence` when given, `logit_probs`) and the COO edges (`targets`, `sources`, `weights`) in the
`EdgeTable` convention. `load_full_graph(path)` reads both back into an `EdgeTable` and the metadata.
Both files are written atomically; nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from attrgraph.edge_table import EdgeTable
from attrgraph.nodes import KINDS
from decomposer.errors import ArtifactFormatError
from decomposer.io import atomic_write_bytes, atomic_write_json

FULL_GRAPH_FORMAT = "attribution_graph_full"
FULL_GRAPH_FORMAT_VERSION = 1
_NODE_TENSORS = ("kind", "pos", "module", "index", "activation", "ci")
_EDGE_TENSORS = ("targets", "sources", "weights")


def tensors_path(path: str | Path) -> Path:
    """The safetensors file that goes with the metadata file `path`."""
    return Path(path).with_suffix(".safetensors")


def save_full_graph(
    table: EdgeTable, path: str | Path, meta: Mapping[str, Any] | None = None, influence: Tensor | None = None
) -> Path:
    """Write the graph's tensors and its JSON metadata (`meta` is stored under "meta"); returns `path`."""
    path = Path(path)
    tensors = {name: getattr(table, name).detach().cpu().contiguous() for name in (*_NODE_TENSORS, *_EDGE_TENSORS)}
    tensors["logit_probs"] = table.logit_probs.detach().cpu().contiguous()
    if influence is not None:
        tensors["influence"] = influence.detach().cpu().contiguous()
    atomic_write_bytes(tensors_path(path), save_tensors(tensors))
    return atomic_write_json(
        path,
        {
            "format": FULL_GRAPH_FORMAT,
            "format_version": FULL_GRAPH_FORMAT_VERSION,
            "tensors": tensors_path(path).name,
            "kinds": list(KINDS),
            "module_paths": list(table.module_paths),
            "logit_tokens": list(table.logit_tokens),
            "target_pos": table.target_pos,
            "n_candidates": table.n_candidates,
            "n_nodes": table.n,
            "n_edges": int(table.targets.numel()),
            "meta": dict(meta or {}),
        },
    )


def load_full_graph(path: str | Path) -> tuple[EdgeTable, dict[str, Any], Tensor | None]:
    """(table, metadata under "meta", influence or None) from files written by `save_full_graph`.

    Raises:
        ArtifactFormatError: A missing file, another format or version, or tensors that do not match.
    """
    path = Path(path)
    if not path.is_file() or not tensors_path(path).is_file():
        raise ArtifactFormatError(
            f"{str(path)!r} and {tensors_path(path).name!r} beside it must both exist; write them with "
            "`save_full_graph` (or `PromptGraph.save`)."
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FULL_GRAPH_FORMAT or data.get("format_version") != FULL_GRAPH_FORMAT_VERSION:
        raise ArtifactFormatError(
            f"{str(path)!r} is format {data.get('format')!r} version {data.get('format_version')!r}; expected "
            f"{FULL_GRAPH_FORMAT!r} version {FULL_GRAPH_FORMAT_VERSION}. Rewrite it with `save_full_graph`."
        )
    t = load_tensors(tensors_path(path).read_bytes())
    missing = [k for k in (*_NODE_TENSORS, *_EDGE_TENSORS, "logit_probs") if k not in t]
    if missing or int(t["kind"].numel()) != data["n_nodes"] or int(t["targets"].numel()) != data["n_edges"]:
        raise ArtifactFormatError(
            f"{tensors_path(path).name!r} does not match {path.name!r} (missing {missing} or other counts); "
            "write both files again with `save_full_graph`."
        )
    table = EdgeTable(
        module_paths=list(data["module_paths"]),
        **{k: t[k] for k in (*_NODE_TENSORS, *_EDGE_TENSORS)},
        logit_tokens=list(data["logit_tokens"]),
        logit_probs=t["logit_probs"].to(torch.float64),
        target_pos=int(data["target_pos"]),
        n_candidates=int(data["n_candidates"]),
    )
    return table, data["meta"], t.get("influence")

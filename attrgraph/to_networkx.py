"""Phase 5's last step: an attribution graph as an `nx.DiGraph` in the convention of `attrgraph.export`.

`table_to_networkx` converts an `EdgeTable` (or the nodes and edges pruning kept of it), labelling every
node; `attrgraph.pipeline.attribute_prompt` is the full pipeline (`attrgraph.reference.build_graph`, every
edge of a short prompt unpruned, is the reference the tests compare it to).
Edges with weight exactly 0 are structural zeros and are not stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx
import torch
from torch import Tensor

from attrgraph.edge_table import EdgeTable
from attrgraph.labels import label_for, label_source
from attrgraph.nodes import NodeId, module_short_name, node_row, short_label
from decomposer.vpd.run import Decomposition


def count_blocks(d: Decomposition) -> int:
    """Blocks of the target that hold a decomposed matrix, counted up to the last one."""
    return 1 + max(module_short_name(p)[0] for p in d.module_paths)


def _label(node: NodeId, token: str, labels: Mapping[str, str] | None) -> str:
    """A given label for the node or its subcomponent (with the node's short name), else matrix and prompt token."""
    found = label_for(labels, node) if labels else None
    if found is not None:
        return found if str(node) in labels else f"{short_label(node)} {found}"
    return f"{short_label(node)} {token!r}"


def _graph_attrs(
    prompt: str,
    prompt_tokens: Sequence[str],
    target_pos: int,
    target_id: int | None,
    target_text: str,
    settings: Mapping | None,
    report: Mapping | None,
) -> dict:
    return dict(
        prompt=prompt,
        prompt_tokens=list(prompt_tokens),
        target_pos=target_pos,
        target_token=target_text,
        target_token_id=target_id,
        report=dict(report or {}),
        qk_pairs=[],
        settings=dict(settings or {}),
    )


def _node_attrs(
    node: NodeId,
    token: str,
    ci: float,
    activation: float,
    prob: float | None,
    target_id: int | None,
    token_text: Mapping[int, str],
    labels: Mapping[str, str] | None,
    n_blocks: int,
) -> dict:
    attrs = {
        "kind": node.kind,
        "module": node.module,
        "block": None,
        "sublayer": None,
        "pos": node.pos,
        "index": node.index,
        "row": node_row(node, n_blocks=n_blocks),
        "ci": ci,
        "activation": activation,
        "token": token,
    }
    if node.module is not None:
        attrs["block"], _, attrs["sublayer"] = module_short_name(node.module)
    if node.kind == "logit":
        attrs.update(token_id=node.index, prob=prob, logit_token=token_text[node.index])
        attrs["label"] = f"→ {token_text[node.index]!r} p={prob:.3f}"
        attrs["is_target"] = node.index == target_id
    else:
        attrs["label"] = _label(node, token, labels)
        found = label_for(labels, node) if labels else None
        if found is not None:
            attrs["label_source"] = label_source(found)  # stats, llm or user: the explorer marks which
    return attrs


def table_to_networkx(
    table: EdgeTable,
    *,
    prompt: str,
    prompt_tokens: Sequence[str],
    token_text: Mapping[int, str],
    n_blocks: int,
    labels: Mapping[str, str] | None = None,
    settings: Mapping | None = None,
    report: Mapping | None = None,
    node_mask: Tensor | None = None,
    edge_mask: Tensor | None = None,
    influence: Tensor | None = None,
) -> nx.DiGraph:
    """The `EdgeTable`'s nodes and edges (those in `node_mask` / `edge_mask` when given) as a DiGraph.

    `influence` (n,), when given, becomes each node's `influence` attribute. Logit nodes get `prob` from
    `table.logit_probs`.
    """
    target_id = table.logit_tokens[0] if table.logit_tokens else None
    G = nx.DiGraph()
    G.graph.update(
        _graph_attrs(
            prompt,
            prompt_tokens,
            table.target_pos,
            target_id,
            token_text[target_id] if table.logit_tokens else "",
            settings,
            report,
        )
    )
    keep = torch.arange(table.n) if node_mask is None else node_mask.cpu().nonzero().squeeze(1)
    nodes = table.nodes(keep)
    ci, act = table.ci[keep].tolist(), table.activation[keep].tolist()
    infl = influence[keep].tolist() if influence is not None else None
    logit_prob = dict(zip(table.logit_tokens, table.logit_probs.tolist(), strict=True))
    for j, node in enumerate(nodes):
        prob = logit_prob[node.index] if node.kind == "logit" else None
        attrs = _node_attrs(node, prompt_tokens[node.pos], ci[j], act[j], prob, target_id, token_text, labels, n_blocks)
        if infl is not None:
            attrs["influence"] = infl[j]
        G.add_node(str(node), **attrs)
    t, s, w = table.targets.cpu(), table.sources.cpu(), table.weights.cpu()
    if edge_mask is not None:
        m = edge_mask.cpu()
        t, s, w = t[m], s[m], w[m]
    names = {int(i): str(n) for i, n in zip(keep.tolist(), nodes, strict=True)}
    pos = {int(i): n.pos for i, n in zip(keep.tolist(), nodes, strict=True)}
    G.add_edges_from(
        (names[si], names[ti], {"weight": wt, "cross_position": pos[si] != pos[ti]})
        for ti, si, wt in zip(t.tolist(), s.tolist(), w.tolist(), strict=True)
    )
    return G

"""Assemble an attribution graph as an `nx.DiGraph` in the convention of `attrgraph.export`.

`table_to_networkx` converts an `EdgeTable` (or the nodes and edges pruning kept of it), labelling every
node; `attrgraph.pipeline.attribute_prompt` is the full pipeline (`attrgraph.reference.build_graph`, every
edge of a short prompt unpruned, is the reference the tests compare it to).
Edges with weight exactly 0 are structural zeros and are not stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from attrgraph.edge_table import EdgeTable
from attrgraph.labels import label_for, label_source
from attrgraph.nodes import NodeId, module_short_name, node_row, short_label
from decomposer.errors import VpdError
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


def check_prompt(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target_token: str | None,
    target_pos: int | None,
) -> tuple[Tensor, int, int | None]:
    """Check a prompt and its read-out without running the model: (token ids (1, T), t*, label id or None).

    Raises:
        VpdError: An empty prompt, a prompt longer than the context, a target that is not one token, or a
            position out of range.
    """
    return check_model_prompt(d.model.target, tokenizer, prompt, target_token, target_pos)


def check_model_prompt(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target_token: str | None,
    target_pos: int | None,
) -> tuple[Tensor, int, int | None]:
    """`check_prompt` against a model without a decomposition (its config gives the context)."""
    if not prompt.strip():
        raise VpdError("`prompt` is empty. Pass the text to explain, e.g. 'The princess lost her'.")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    T = ids.shape[1]
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and T > context:
        raise VpdError(
            f"`prompt` is {T} tokens, longer than the model's context of {context}; shorten it to {context} tokens."
        )
    if target_pos is None:
        target_pos = T - 1
    if not -T <= target_pos < T:
        raise VpdError(f"`target_pos` {target_pos} is out of range for a {T}-token prompt; use 0..{T - 1}.")
    target_pos %= T
    label_id = None
    if target_token is not None:
        label_ids = tokenizer(target_token, add_special_tokens=False)["input_ids"]
        if len(label_ids) != 1:
            raise VpdError(
                f"`target_token` {target_token!r} is {len(label_ids)} tokens, not one. Pass a single token "
                "such as ' her' (mind the leading space)."
            )
        label_id = label_ids[0]
    return ids, target_pos, label_id


def resolve_prompt(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target_token: str | None,
    target_pos: int | None,
) -> tuple[Tensor, int, int, Tensor]:
    """Check a prompt and its read-out: (token ids (1, T), t*, label id, P(next token) at t* under the target).

    Raises:
        VpdError: As `check_prompt`.
    """
    ids, target_pos, label_id = check_prompt(d, tokenizer, prompt, target_token, target_pos)
    with torch.no_grad():
        logits = d.model.target(ids[:, : target_pos + 1].to(d.model_device)).logits[0, target_pos]
    probs = torch.softmax(logits.double(), -1).cpu()
    return ids, target_pos, int(probs.argmax()) if label_id is None else label_id, probs

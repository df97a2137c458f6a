"""Assemble an attribution graph as an `nx.DiGraph` in the convention of `attrgraph.export`.

`build_graph` computes every edge of one prompt (`attrgraph.edges.attribute_edges`) and labels every
node; `table_to_networkx` converts an `EdgeTable` (or the nodes and edges pruning kept of it).
`attrgraph.pipeline.attribute_prompt` is the full pipeline.
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
from attrgraph.edges import attribute_edges
from attrgraph.labels import label_for, label_source
from attrgraph.nodes import NodeId, module_short_name, node_row, short_label
from attrgraph.settings import GraphSettings
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition


def count_blocks(d: Decomposition) -> int:
    """Blocks of the target that hold a decomposed matrix, counted up to the last one."""
    return 1 + max(module_short_name(p)[0] for p in d.module_paths)


def logit_tokens(probs: Tensor, label: int, settings: GraphSettings) -> list[int]:
    """The label first, then the likeliest tokens until `logit_prob` cumulative probability, `max_logits` at most."""
    tokens, mass = [label], 0.0
    for tok in probs.argsort(descending=True).tolist():
        if len(tokens) >= settings.max_logits or mass >= settings.logit_prob:
            break
        mass += float(probs[tok])
        if tok != label:
            tokens.append(tok)
    return tokens


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


def build_graph(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    target_token: str | None = None,
    target_pos: int | None = None,
    ci: Mapping[str, Tensor] | None = None,
    labels: Mapping[str, str] | None = None,
    weight_by_source_ci: bool = True,
    batch_size: int = 32,
    report: Mapping[str, float] | None = None,
) -> nx.DiGraph:
    """The full (unpruned, unbudgeted) attribution graph of `prompt` as a DiGraph, for small prompts.

    `attrgraph.attribute_prompt` is the pipeline (node budget, pruning on tensors, files); this is its
    edge step with every node's edges, converted whole to networkx.

    Args:
        d: The decomposition.
        tokenizer: The target's tokenizer.
        prompt: Text; it is tokenized without special tokens.
        target_token: The label whose logit the graph explains; it must be one token. By default the
            target model's most likely next token.
        target_pos: Read-out position t*; the prompt is truncated after it.
        ci: Path → (T, C) CI deciding which subcomponents are nodes (e.g. from per-prompt optimisation);
            by default the CI network's values.
        labels: Node id or `block.part.matrix:c` → label, e.g. from component statistics.
        weight_by_source_ci: Multiply edges by the source's CI (the paper's form).
        batch_size: Target rows per backward pass.
        report: Faithfulness numbers to store with the graph.

    Raises:
        VpdError: An empty prompt, a prompt longer than the context, a target that is not one token, or a
            position out of range.
    """
    ids, target_pos, label_id, probs = resolve_prompt(d, tokenizer, prompt, target_token, target_pos)
    readout = logit_tokens(probs, label_id, GraphSettings())
    table = attribute_edges(
        d,
        ids,
        target_pos=target_pos,
        logit_tokens=readout,
        logit_probs=probs,
        ci=dict(ci) if ci is not None else None,
        weight_by_source_ci=weight_by_source_ci,
        batch_size=batch_size,
    )
    return table_to_networkx(
        table,
        prompt=prompt,
        prompt_tokens=[tokenizer.decode([i]) for i in ids[0, : target_pos + 1].tolist()],
        token_text={t: tokenizer.decode([t]) for t in readout},
        n_blocks=count_blocks(d),
        labels=labels,
        settings={"weight_by_source_ci": weight_by_source_ci, "batch_size": batch_size},
        report=report,
    )

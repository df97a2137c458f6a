"""Assemble an attribution graph as an `nx.DiGraph` in the convention of `attrgraph.export`.

`build_graph` computes the edges of one prompt (`attrgraph.edges.attribute`) and labels every
node; `to_networkx` converts an existing `Attribution`. Edges with weight exactly 0 are structural
zeros and are not stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from attrgraph.edges import Attribution, attribute
from attrgraph.labels import label_for
from attrgraph.nodes import NodeId, module_short_name, node_row, short_label
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition


def _n_blocks(d: Decomposition) -> int:
    return 1 + max(module_short_name(p)[0] for p in d.module_paths)


def _label(node: NodeId, token: str, labels: Mapping[str, str] | None) -> str:
    """A given label for the node or its subcomponent (with the node's short name), else matrix and prompt token."""
    found = label_for(labels, node) if labels else None
    if found is not None:
        return found if str(node) in labels else f"{short_label(node)} {found}"
    return f"{short_label(node)} {token!r}"


def to_networkx(
    att: Attribution,
    *,
    prompt: str,
    prompt_tokens: Sequence[str],
    token_text: Mapping[int, str],
    probs: Tensor,
    n_blocks: int,
    labels: Mapping[str, str] | None = None,
    settings: Mapping | None = None,
    report: Mapping[str, float] | None = None,
) -> nx.DiGraph:
    """The `Attribution` as a DiGraph; `probs` is P(token) at the target position under the target model."""
    G = nx.DiGraph()
    G.graph.update(
        prompt=prompt,
        prompt_tokens=list(prompt_tokens),
        target_pos=att.target_pos,
        target_token=token_text[att.logit_tokens[0]] if att.logit_tokens else "",
        target_token_id=att.logit_tokens[0] if att.logit_tokens else None,
        report=dict(report or {}),
        qk_pairs=[],
        settings=dict(settings or {}),
    )
    for i, node in enumerate(att.nodes):
        token = prompt_tokens[node.pos]
        attrs = {
            "kind": node.kind,
            "module": node.module,
            "block": None,
            "sublayer": None,
            "pos": node.pos,
            "index": node.index,
            "row": node_row(node, n_blocks=n_blocks),
            "ci": float(att.ci[i]),
            "activation": float(att.activation[i]),
            "token": token,
        }
        if node.module is not None:
            attrs["block"], _, attrs["sublayer"] = module_short_name(node.module)
        if node.kind == "logit":
            attrs.update(token_id=node.index, prob=float(probs[node.index]))
            attrs["label"] = f"→ {token_text[node.index]!r} p={attrs['prob']:.3f}"
            attrs["is_target"] = node.index == G.graph["target_token_id"]
        else:
            attrs["label"] = _label(node, token, labels)
        G.add_node(str(node), **attrs)
    # Bulk conversion: hundreds of thousands of edges are common, and per-edge tensor reads dominated.
    targets, sources = att.A.nonzero(as_tuple=True)
    weights = att.A[targets, sources].tolist()
    names = [str(n) for n in att.nodes]
    pos = [n.pos for n in att.nodes]
    G.add_edges_from(
        (names[s], names[t], {"weight": w, "cross_position": pos[s] != pos[t]})
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
    )
    return G


def resolve_prompt(
    d: Decomposition,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target_token: str | None,
    target_pos: int | None,
) -> tuple[Tensor, int, int, Tensor]:
    """Check a prompt and its read-out: (token ids (1, T), t*, label id, P(next token) at t* under the target).

    Raises:
        VpdError: An empty prompt, a prompt longer than the context, a target that is not one token, or a
            position out of range.
    """
    if not prompt.strip():
        raise VpdError("`prompt` is empty. Pass the text to explain, e.g. 'The princess lost her'.")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    T = ids.shape[1]
    context = getattr(d.model.target.config, "max_position_embeddings", None)
    if context is not None and T > context:
        raise VpdError(f"`prompt` is {T} tokens, longer than the model's context of {context}. Shorten it.")
    if target_pos is None:
        target_pos = T - 1
    if not -T <= target_pos < T:
        raise VpdError(f"`target_pos` {target_pos} is out of range for a {T}-token prompt; use 0..{T - 1}.")
    target_pos %= T
    with torch.no_grad():
        logits = d.model.target(ids[:, : target_pos + 1].to(d.model_device)).logits[0, target_pos]
    probs = torch.softmax(logits.double(), -1).cpu()
    if target_token is None:
        label_id = int(probs.argmax())
    else:
        label_ids = tokenizer(target_token, add_special_tokens=False)["input_ids"]
        if len(label_ids) != 1:
            raise VpdError(
                f"`target_token` {target_token!r} is {len(label_ids)} tokens, not one. Pass a single token "
                "such as ' her' (mind the leading space)."
            )
        label_id = label_ids[0]
    return ids, target_pos, label_id, probs


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
    """Attribution graph of `prompt` read out at `target_pos` (default: the last token).

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
    # The label first, then the most likely tokens up to 0.95 cumulative probability, at most 10.
    order = probs.argsort(descending=True).tolist()
    logit_tokens, mass = [label_id], 0.0
    for tok in order:
        if len(logit_tokens) >= 10 or mass >= 0.95:
            break
        mass += float(probs[tok])
        if tok != label_id:
            logit_tokens.append(tok)
    att = attribute(
        d, ids, target_pos=target_pos, logit_tokens=logit_tokens, ci=dict(ci) if ci is not None else None,
        weight_by_source_ci=weight_by_source_ci, batch_size=batch_size,
    )  # fmt: skip
    pieces = [tokenizer.decode([i]) for i in ids[0, : target_pos + 1].tolist()]
    return to_networkx(
        att,
        prompt=prompt,
        prompt_tokens=pieces,
        token_text={t: tokenizer.decode([t]) for t in logit_tokens},
        probs=probs,
        n_blocks=_n_blocks(d),
        labels=labels,
        settings={"weight_by_source_ci": weight_by_source_ci, "batch_size": batch_size},
        report=report,
    )

"""The references the fast paths are tested against, in one place; nothing in the pipeline calls them.

Each states its algorithm in the plainest form, dense and slow, so a test can compare the fast code to it:

- `attribute_reference`: one `autograd.grad` per target node on a batch-1 forward, every (t, c) entry a leaf;
  checks `attrgraph.edges.attribute_edges` (packed targets, only alive entries as leaves).
- `influence_prune` on a dense A[target, source] (with `influence`, `normalized_abs`); checks
  `attrgraph.prune.prune_coo` on COO edges.
- `build_graph`: every edge of a short prompt as one unpruned networkx graph; checks
  `attrgraph.pipeline.attribute_prompt` (node budget, pruning on tensors).
- `trace_layer_pairs`: which decomposed matrices feed which, traced with `autograd.grad`; checks the structural
  zeros of the edge step (docs/attribution-graphs.md, "Which pairs can connect").

Influence pruning (docs/attribution-graphs.md, "Influence pruning"), as `influence_prune` runs it:

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
7. Return masks; the graph is left alone.

Layer pairs: one tiny dummy forward runs through `direct_effect_leaves` with every (t, c) entry alive, so each
is a leaf; for every target (one element of each decomposed module's a = xV, and one logit) `autograd.grad` is
taken with respect to every leaf with `allow_unused=True`. A non-None, nonzero gradient means the target depends
directly on that source. Source names: the module path for component leaves, ``delta/{path}`` for delta leaves
and ``"emb"`` for the embedding leaf; target names: the module path, or ``"logit"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import networkx as nx
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from attrgraph.candidates import choose_logit_tokens, resolve_prompt
from attrgraph.edge_table import Attribution
from attrgraph.edges import attribute_edges
from attrgraph.leaves import direct_effect_leaves
from attrgraph.prune import MAX_PRODUCTS, check_threshold, cutoff, kind_masks
from attrgraph.settings import DEFAULTS
from attrgraph.to_networkx import count_blocks, table_to_networkx
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition

__all__ = [
    "EMB",
    "LOGIT",
    "PruneMasks",
    "attribute_reference",
    "build_graph",
    "delta_name",
    "influence",
    "influence_prune",
    "normalized_abs",
    "trace_layer_pairs",
]


def attribute_reference(
    d: Decomposition,
    tokens: Tensor,
    *,
    target_pos: int | None = None,
    logit_tokens: Sequence[int] | None = None,
    ci: dict[str, Tensor] | None = None,
    weight_by_source_ci: bool = True,
) -> Attribution:
    """The dense graph of `attribute_edges` with one `autograd.grad` per target node on a batch-1 forward.

    Every (t, c) entry is a leaf here, dead or alive, as in the plain formulation; `attribute_edges` makes only
    the alive entries leaves, so agreement between the two also checks that restriction. Arguments and errors
    are those of `attribute_edges`.
    """
    return attribute_edges(
        d,
        tokens,
        target_pos=target_pos,
        logit_tokens=logit_tokens,
        ci=ci,
        weight_by_source_ci=weight_by_source_ci,
        _batched=False,
    ).attribution()


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


def influence_prune(
    A: Tensor,
    kinds: Sequence[str],
    logit_probs: Tensor,
    *,
    node_threshold: float = DEFAULTS.node_threshold,
    edge_threshold: float = DEFAULTS.edge_threshold,
) -> PruneMasks:
    """Influence pruning on a dense A, steps 1–7 of the module docstring.

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
    check_threshold("node_threshold", node_threshold)
    check_threshold("edge_threshold", edge_threshold)
    _check_square(A)
    n = A.shape[0]
    masks = kind_masks(kinds, n)
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
    node_mask = node_influence >= cutoff(node_influence, node_threshold)
    node_mask |= masks["emb"] | is_logit

    pruned = A.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    pruned_hat = normalized_abs(pruned)
    edge_scores = pruned_hat * (_series(pruned_hat, w) + w)[:, None]
    edge_mask = (edge_scores >= cutoff(edge_scores, edge_threshold)) & (pruned_hat > 0)

    _drop_dangling(node_mask, edge_mask, masks["comp"], masks["delta"])
    return PruneMasks(node_mask, edge_mask, node_influence)


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
    batch_size: int = DEFAULTS.batch_size,
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
    readout = choose_logit_tokens(probs, label_id)
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


EMB = "emb"
LOGIT = "logit"


def delta_name(path: str) -> str:
    """Source name of a module's delta leaf."""
    return f"delta/{path}"


def trace_layer_pairs(d: Decomposition, n_tokens: int = 2) -> dict[str, set[str]]:
    """Target → set of sources it directly depends on, for every decomposed module and the logits.

    The element traced for each target sits at the last position, so sources at earlier positions
    (k/v → o inside one attention layer) are found too.

    Args:
        d: The decomposition whose component model is traced.
        n_tokens: Length of the dummy prompt (token ids 0, 1, ...; distinct tokens keep q and k from
            dropping out of o through identical values at every position).

    Returns:
        Target name (module path or ``"logit"``) → source names.

    Raises:
        VpdError: If `n_tokens` is below 1.
    """
    if n_tokens < 1:
        raise VpdError(f"`n_tokens` must be >= 1; got {n_tokens}.")
    vocab = d.model.target.get_input_embeddings().num_embeddings
    tokens = (torch.arange(n_tokens, device=d.model_device) % vocab)[None]
    # alive=None: every entry is a leaf, so no source can hide behind a dead (constant) entry.
    with torch.enable_grad(), direct_effect_leaves(d.model, alive=None) as rec:
        logits = d.model.target(tokens).logits
    leaves = rec.leaves()
    names = [EMB, *rec.comp_leaves, *(delta_name(p) for p in rec.delta_leaves)]

    def sources(scalar: Tensor) -> set[str]:
        if not scalar.requires_grad:
            return set()
        grads = torch.autograd.grad(scalar, leaves, allow_unused=True, retain_graph=True)
        return {name for name, g in zip(names, grads, strict=True) if g is not None and bool(g.ne(0).any())}

    pairs = {path: sources(rec.acts[path][0, -1, 0]) for path in d.module_paths}
    # The largest logit, not token 0: a padding token's tied embedding row is zero, so its logit reads nothing.
    pairs[LOGIT] = sources(logits[0, -1, int(logits[0, -1].detach().abs().argmax())])
    return pairs

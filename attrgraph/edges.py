"""Attribution-graph edges between VPD subcomponents (docs/attribution-graphs.md §1–§2).

Orientation, stated once: nodes are held in one order (`EdgeTable`, `Attribution.nodes`), and edges
run A[target, source] over indices into it (circuit-tracer's orientation), as COO (`EdgeTable.targets`,
`.sources`, `.weights`) or as the dense `Attribution.A`.

Algorithm:

1. Truncate the prompt after `target_pos` (later positions cannot reach the read-out) and run one
   clean forward to get the module inputs, the CI network's g (unless `ci` is given) and the
   probabilities that choose the logit tokens (cumulative 0.95, at most 10).
2. Nodes: one `emb` per position, one `comp` per (module, t, c) with g > 0, one `delta` per
   (module, t), and one `logit` per chosen token at `target_pos`.
3. Run ONE forward of the component model with all masks 1 and the delta mask 1, so the weights equal
   the target's. In every decomposed module compute a = xV and feed the network
   `a_dead @ U + Σ_j leaf_j u_{c_j} + delta_leaf + bias`: `leaf` is a detached leaf of a at the comp
   nodes (t_j, c_j) only, `a_dead` is a with those entries zeroed (a constant, never a source), and
   `delta_leaf` is a detached leaf of x Δᵀ. The input embedding's output is made a leaf too. Leaves
   at the alive entries only keep each backward at O(n_alive · d_out) per module, not O(T · C · d_out).
   The cut is `attrgraph.leaves.direct_effect_leaves`.
4. Because every path between two decomposed matrices now ends at a leaf or a constant, the gradient
   of a target (a_c = x_t · v_c at its position, read from the module input, or a raw logit) with
   respect to a leaf is the direct-effect gradient (·)*.
5. Edge weights: (∂a_t/∂a_s)* · a_s · g_s for comp sources (g_s only if `weight_by_source_ci`),
   Σ_d (∂a_t/∂e_d)* e_d for embedding sources and Σ_j (∂a_t/∂δ_j)* δ_j for delta sources.
6. Batching: the prompt is replicated K times along the batch dimension and the chosen target scalars,
   each read from one copy, are summed; copies never interact, so copy k of each leaf gradient holds
   only its own targets. A copy carries one target per position plus one attention-output (o) target
   per block: under the cut a target at position t that reads the residual stream or an MLP's hidden
   layer reaches only leaves at t, and an o target of block b only block b's q/k/v leaves, so each
   source's gradient belongs to the target in its slot (`slot_groups`; without decomposed q/k/v and
   o in every block, one target per copy). The copy-independent parts of the hook (a, x Δᵀ,
   a_dead @ U) are computed once and broadcast. `attrgraph.reference.attribute_reference` does one
   `autograd.grad` per target instead, with every (t, c) entry a leaf.
7. Node budget (`max_nodes`): the logits' rows first; then, as circuit-tracer does, the influence of
   every node on the logits is estimated from the rows found so far and the next queue of targets is
   the unvisited comp nodes of largest estimate, until the budget is spent. Comp nodes outside the
   budget are dropped with their outgoing edges; every edge into a kept node is exact.
8. The result is an `EdgeTable`: a node table and the nonzero edges as COO tensors, never a dense
   matrix (`Attribution` and `EdgeTable.dense` give one for small graphs and tests).

All pairs are computed; structurally disallowed pairs (§2.3, §2.4) come out as exact zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attrgraph.candidates import CandidateNodes, prepare_inputs
from attrgraph.edge_table import Attribution, EdgeTable
from attrgraph.leaves import LeafRecord, direct_effect_leaves
from attrgraph.nodes import KINDS
from attrgraph.settings import DEFAULT_MAX_NODES, DEFAULTS
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition

__all__ = ["attribute", "attribute_edges"]


# The budget's first queues hold this many batches of targets between influence estimates; larger first
# queues pick by the logits' direct inputs alone and miss influential nodes further down.
QUEUE_BATCHES = 1


def _target_sum(
    d: Decomposition, graph: CandidateNodes, rec: LeafRecord, logits: Tensor, chunk: Tensor, copy: Tensor
) -> Tensor:
    """Σ of target node chunk[i] read from copy copy[i]: a_c = x[t] · v_c for comp targets, the raw logit for logits.

    Reading a_c from the module input costs O(d_in) in the backward, where indexing the (B, T, C) product
    a = xV would cost a full (B, T, C) × (C, d_in) matmul per backward.
    """
    module, pos, index = graph.module[chunk], graph.pos[chunk], graph.index[chunk]
    is_logit = graph.kind[chunk] == KINDS.index("logit")
    total = logits.new_zeros(())
    if bool(is_logit.any()):
        total = total + logits[copy[is_logit], -1, index[is_logit]].sum()  # logit targets all sit at t*, the last
    for j in module[~is_logit].unique().tolist():
        sel = (module == j) & ~is_logit
        p = graph.paths[j]
        V = d.model.components(p).V.detach()
        total = total + (rec.inputs[p][copy[sel], pos[sel]] * V[:, index[sel]].T).sum()
    return total


_ATTN_IN = ("q", "k", "v", "qkv")


def slot_groups(d: Decomposition, graph: CandidateNodes) -> tuple[Tensor, Tensor, int] | None:
    """(slot key of each node as a target, as a source, number of keys), or None where packing is unsafe.

    Under the direct-effect cut a target reaches few leaves: one that reads the residual stream or an MLP's
    hidden layer at position t (q, k, v, gate, up, down, logits) reaches only leaves at t; an attention output
    target (o) of block b reaches only block b's q/k/v leaves (any position). So one copy of the prompt can
    carry one target per position plus one o target per block, and each source's gradient belongs to the
    target of its slot: key = t for the first kind, T + b for the second. This holds when every block's
    attention has its input and output matrices decomposed (nothing else carries a gradient across
    positions); otherwise None, and each copy carries one target.
    """
    from attrgraph.nodes import module_short_name

    try:
        roles = [module_short_name(p) for p in graph.paths]
    except VpdError:
        return None
    n_layers = getattr(d.model.target.config, "num_hidden_layers", None)
    blocks = {b for b, _, _ in roles}
    if n_layers is None or blocks != set(range(n_layers)):
        return None
    for b in blocks:
        attn = {short for bb, part, short in roles if bb == b and part == "attn"}
        if "o" not in attn or not ({"q", "k", "v"} <= attn or "qkv" in attn):
            return None
    device = graph.kind.device
    block = torch.tensor([b for b, _, _ in roles] + [-1], device=device)[graph.module]  # module -1 → -1
    is_o = torch.tensor([short == "o" for *_, short in roles] + [False], device=device)[graph.module]
    is_in = torch.tensor([short in _ATTN_IN for *_, short in roles] + [False], device=device)[graph.module]
    target_key = torch.where(is_o & (graph.kind == KINDS.index("comp")), graph.T + block, graph.pos)
    source_key = torch.where(is_in, graph.T + block, graph.pos)
    return target_key, source_key, graph.T + n_layers


class _Rows:
    """Backward passes that fill rows of A for chosen target nodes, kept as COO pieces."""

    def __init__(self, d: Decomposition, graph: CandidateNodes, rec: LeafRecord, logits: Tensor, pack: bool):
        self.d, self.graph, self.rec, self.logits = d, graph, rec, logits
        self.K = logits.shape[0]
        self.leaves = rec.leaves()
        self.keys = slot_groups(d, graph) if pack else None
        self.pieces: list[tuple[Tensor, Tensor, Tensor]] = []
        self.backwards = 0

    def run(self, targets: Tensor, progress: Any = None) -> None:
        """Compute the rows of the target nodes `targets`, packing them into as few backward passes as possible."""
        if self.keys is None:
            for chunk in targets.split(self.K):
                self._backward(chunk, torch.arange(len(chunk), device=chunk.device), None)
                if progress is not None:
                    progress.update(len(chunk))
            return
        # Rank each target among those of its slot key; rank r goes to copy r % K of backward r // K.
        key = self.keys[0][targets]
        order = torch.sort(key, stable=True).indices
        targets, key = targets[order], key[order]
        first = torch.searchsorted(key, key, side="left")
        rank = torch.arange(len(key), device=key.device) - first
        for b in range(int(rank.max()) // self.K + 1 if len(rank) else 0):
            sel = (rank // self.K) == b
            self._backward(targets[sel], rank[sel] % self.K, key[sel])
            if progress is not None:
                progress.update(int(sel.sum()))

    def _backward(self, chunk: Tensor, copy: Tensor, key: Tensor | None) -> None:
        grads = torch.autograd.grad(
            _target_sum(self.d, self.graph, self.rec, self.logits, chunk, copy),
            self.leaves,
            allow_unused=True,
            retain_graph=True,
        )
        self.backwards += 1
        n_copies = int(copy.max()) + 1
        rows = self.logits.new_zeros(n_copies, self.graph.n).detach()
        # Copies share no computation, so the sum separates in the gradient: row k holds copy k's targets.
        self.graph.source_rows(self.rec, grads, rows)
        k, s = rows.nonzero(as_tuple=True)
        if key is None:
            target = chunk[k]
        else:
            slots = torch.full((n_copies, self.keys[2]), -1, dtype=torch.long, device=k.device)
            slots[copy, key] = chunk
            target = slots[k, self.keys[1][s]]
            if bool((target < 0).any()):  # a gradient outside every slot: the packing assumption failed
                raise RuntimeError("an edge reached a source outside its target's slot; packing is unsafe here")
        self.pieces.append((target, s, rows[k, s]))

    def coo(self) -> tuple[Tensor, Tensor, Tensor]:
        if not self.pieces:
            empty = torch.zeros(0, dtype=torch.long, device=self.logits.device)
            return empty, empty, self.logits.new_zeros(0).detach()
        t, s, w = (torch.cat(x) for x in zip(*self.pieces, strict=True))
        self.pieces = [(t, s, w)]
        return t, s, w


def _choose_and_run(rows: _Rows, graph: CandidateNodes, logit_w: Tensor, K: int, budget: int, progress: bool) -> Tensor:
    """Rows of the logits, then of the `budget` comp nodes of largest estimated influence; returns the visited mask.

    As circuit-tracer does: after each queue, the influence on the logits of every node is recomputed from the
    rows found so far (nodes whose rows are pending pass nothing on), and the next queue takes the unvisited
    comp nodes of largest estimate. Our choice: the queue grows with the nodes already visited (at least
    `QUEUE_BATCHES` batches, then half of them), so the estimate is recomputed O(log budget) times; one backward
    carries many targets (`_Rows.run`), so a queue costs a few backwards.
    """
    from tqdm.auto import tqdm

    from attrgraph.prune import coo_normalized_abs, coo_series

    rows.run(graph.logit_nodes())
    is_comp = graph.kind == KINDS.index("comp")
    visited = torch.zeros(graph.n, dtype=torch.bool, device=is_comp.device)
    done = 0
    with tqdm(total=budget, desc="edges", disable=not progress) as bar:
        while done < budget:
            t, s, w = rows.coo()
            estimate = coo_series(graph.n, t, s, coo_normalized_abs(graph.n, t, w.double()), logit_w)
            estimate[~is_comp | visited] = -1.0
            size = min(max(QUEUE_BATCHES * K, done // 2), budget - done)
            queue = estimate.topk(size).indices
            rows.run(queue, bar)
            visited[queue] = True
            done += size
    return visited


def attribute_edges(
    d: Decomposition,
    tokens: Tensor,
    *,
    target_pos: int | None = None,
    logit_tokens: Sequence[int] | None = None,
    logit_probs: Tensor | None = None,
    ci: dict[str, Tensor] | None = None,
    weight_by_source_ci: bool = True,
    batch_size: int = DEFAULTS.batch_size,
    max_nodes: int | None = None,
    progress: bool = False,
    _batched: bool = True,
) -> EdgeTable:
    """The attribution graph of one prompt as an `EdgeTable`, batching `batch_size` target nodes per backward.

    Args:
        d: The decomposition (component model plus CI function).
        tokens: Prompt token ids, (T,) or (1, T). Positions after `target_pos` are dropped.
        target_pos: Read-out position t*; defaults to the last position.
        logit_tokens: Token ids of the logit nodes; default: the top tokens at t* by probability up to a
            cumulative 0.95, at most 10.
        logit_probs: P(·) at t* over the vocabulary (e.g. from the target's own forward); default: from the
            graph's forward.
        ci: Path → CI (T, C) or (1, T, C); comp nodes are the entries > 0. Default: the CI network's g.
        weight_by_source_ci: Multiply comp-source edges by the source's g (the paper's form).
        batch_size: Target nodes per backward (prompt copies per forward).
        max_nodes: Comp nodes whose rows are computed, chosen by estimated influence (`_choose_and_run`);
            None, or a budget at least the number of alive entries, computes every row in node order.
        progress: Show a tqdm bar over the chosen nodes.

    Raises:
        VpdError: On a misshapen prompt, an out-of-range position or token, a `ci` that does not match
            the decomposed modules, or a `batch_size` or `max_nodes` below 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise VpdError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
    if max_nodes is not None and (isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1):
        raise VpdError(
            f"`max_nodes` must be a positive integer or None; got {max_nodes!r}. Pass e.g. {DEFAULT_MAX_NODES}."
        )
    tokens, target_pos, logit_tokens, ci, probs = prepare_inputs(d, tokens, target_pos, logit_tokens, ci)
    graph = CandidateNodes(d, tokens.shape[1], target_pos, logit_tokens, ci)
    comp_nodes = graph.comp_nodes()
    n_targets = len(comp_nodes) + len(logit_tokens)
    K = min(batch_size, max(n_targets, 1)) if _batched else 1
    # Batched: only comp nodes are leaves (dead entries are never read as sources, so they stay constants).
    # The reference keeps every (t, c) entry a leaf, so comparing the two also checks that restriction.
    alive = graph.alive() if _batched else None
    with torch.enable_grad(), direct_effect_leaves(d.model, alive=alive, copies=True) as rec:
        # Only t* is read out, so the (vocab-sized) head runs at the last position only.
        logits = d.model.target(tokens.expand(K, -1), logits_to_keep=1).logits
    if any(not 0 <= tok < logits.shape[-1] for tok in logit_tokens):
        raise VpdError(f"`logit_tokens` must be token ids in [0, {logits.shape[-1]}); got {list(logit_tokens)}.")
    if logit_probs is None:
        logit_probs = probs if probs is not None else logits[0, -1].detach().double().softmax(-1)
    token_probs = logit_probs.detach().double()[logit_tokens].cpu()
    graph.bind(rec, weight_by_source_ci)
    rows = _Rows(d, graph, rec, logits, pack=_batched)
    if max_nodes is None or max_nodes >= len(comp_nodes):
        from tqdm.auto import tqdm

        with tqdm(total=n_targets, desc="edges", disable=not progress) as bar:
            rows.run(torch.cat([comp_nodes, graph.logit_nodes()]), bar)
        kept = torch.ones(graph.n, dtype=torch.bool, device=comp_nodes.device)
    else:
        w = torch.zeros(graph.n, dtype=torch.float64, device=comp_nodes.device)
        w[graph.logit_start :] = token_probs.to(w)
        kept = _choose_and_run(rows, graph, w, K, max_nodes, progress) | (graph.kind != KINDS.index("comp"))
    activation, node_ci = graph.activation_and_ci(rec, logits)
    t, s, wts = rows.coo()
    inside = kept[s]  # targets are kept by construction; sources outside the budget are dropped
    new_index = kept.long().cumsum(0) - 1
    t, s, wts = new_index[t[inside]], new_index[s[inside]], wts[inside]
    order = (t * kept.sum() + s).argsort()  # edges sorted by (target, source): the dense order of A
    return EdgeTable(
        module_paths=list(graph.paths),
        kind=graph.kind[kept],
        pos=graph.pos[kept],
        module=graph.module[kept],
        index=graph.index[kept],
        activation=activation[kept].detach(),
        ci=node_ci[kept].detach(),
        targets=t[order],
        sources=s[order],
        weights=wts[order].detach(),
        logit_tokens=list(logit_tokens),
        logit_probs=token_probs,
        target_pos=target_pos,
        n_candidates=len(comp_nodes),
    )


def attribute(d: Decomposition, tokens: Tensor, **kwargs: Any) -> Attribution:
    """`attribute_edges` as a dense `Attribution` (nodes, A[target, source], activations, CI), for small graphs
    and the tests; keyword arguments and errors are those of `attribute_edges`."""
    return attribute_edges(d, tokens, **kwargs).attribution()

"""Attribution-graph edges between VPD subcomponents (attribution-graphs.md §1–§2).

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
   source's gradient belongs to the target in its slot (`_slot_groups`; without decomposed q/k/v and
   o in every block, one target per copy). The copy-independent parts of the hook (a, x Δᵀ,
   a_dead @ U) are computed once and broadcast. `attribute_reference` does one `autograd.grad` per
   target instead, with every (t, c) entry a leaf.
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attrgraph.leaves import LeafRecord, direct_effect_leaves
from attrgraph.nodes import NodeId
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition

__all__ = [
    "KINDS",
    "Attribution",
    "EdgeTable",
    "attribute",
    "attribute_edges",
    "attribute_reference",
    "top_logit_tokens",
]


@dataclass(frozen=True)
class Attribution:
    """One prompt's attribution graph.

    Attributes:
        nodes: Node list; its order indexes `A`, `activation` and `ci`.
        A: Dense (n, n) edge weights, A[target, source].
        activation: Per node: a for comp, ‖e‖ for emb, ‖δ‖ for delta, the raw logit for logit nodes.
        ci: Per node: g for comp nodes, 1.0 (the factor used on their edges) for the other kinds.
        logit_tokens: Token ids of the logit nodes, in node order.
        target_pos: Position t* of the read-out.
    """

    nodes: list[NodeId]
    A: Tensor
    activation: Tensor
    ci: Tensor
    logit_tokens: list[int]
    target_pos: int


KINDS = ("emb", "comp", "delta", "logit")  # `EdgeTable.kind` holds indices into this tuple
# The budget's first queues hold this many batches of targets between influence estimates; larger first
# queues pick by the logits' direct inputs alone and miss influential nodes further down.
QUEUE_BATCHES = 1


@dataclass(frozen=True)
class EdgeTable:
    """One prompt's attribution graph as tensors: a node table and the COO edges among its nodes.

    Nodes come in the order of `Attribution.nodes`: embeddings, subcomponents per module (position-major),
    deltas per module, logits. With a node budget only the chosen subcomponents are nodes; every edge into
    a node is exact, and edges from subcomponents outside the budget are left out.

    Attributes:
        module_paths: The decomposed modules; `module` indexes this list.
        kind: (n,) int8 index into `KINDS`.
        pos: (n,) position.
        module: (n,) module index, -1 for emb and logit nodes.
        index: (n,) c for comp nodes, the token id for logit nodes, -1 otherwise.
        activation: (n,) as `Attribution.activation`.
        ci: (n,) as `Attribution.ci`.
        targets: (nnz,) target node of each nonzero edge.
        sources: (nnz,) its source node.
        weights: (nnz,) its signed weight.
        logit_tokens: Token ids of the logit nodes, in node order.
        logit_probs: (n_logits,) float64 P(token) at t* under the target.
        target_pos: t*.
        n_candidates: Subcomponent nodes alive on the prompt before the budget chose among them.
    """

    module_paths: list[str]
    kind: Tensor
    pos: Tensor
    module: Tensor
    index: Tensor
    activation: Tensor
    ci: Tensor
    targets: Tensor
    sources: Tensor
    weights: Tensor
    logit_tokens: list[int]
    logit_probs: Tensor
    target_pos: int
    n_candidates: int

    @property
    def n(self) -> int:
        return int(self.kind.numel())

    def nodes(self, which: Tensor | None = None) -> list[NodeId]:
        """NodeIds of all nodes, or of the node indices in `which` (read in one transfer, not per node)."""
        columns = (self.kind, self.pos, self.module, self.index)
        if which is not None:
            which = which.to(self.kind.device)
            columns = tuple(c[which] for c in columns)
        out = []
        for kind, pos, module, index in zip(*(c.tolist() for c in columns), strict=True):
            kind = KINDS[kind]
            if kind == "emb":
                out.append(NodeId.emb(pos))
            elif kind == "comp":
                out.append(NodeId.comp(self.module_paths[module], index, pos))
            elif kind == "delta":
                out.append(NodeId.delta(self.module_paths[module], pos))
            else:
                out.append(NodeId.logit(index, pos))
        return out

    def kind_masks(self) -> dict[str, Tensor]:
        return {k: self.kind == i for i, k in enumerate(KINDS)}

    def logit_weights(self) -> Tensor:
        """(n,) float64: each logit node's probability, zero elsewhere (the w of influence)."""
        w = torch.zeros(self.n, dtype=torch.float64, device=self.kind.device)
        w[self.kind == KINDS.index("logit")] = self.logit_probs.to(w)
        return w

    def dense(self) -> Tensor:
        """The (n, n) adjacency A[target, source]; for small graphs only (tests, the dense API)."""
        A = self.weights.new_zeros(self.n, self.n)
        A[self.targets, self.sources] = self.weights
        return A


def _prepare(
    d: Decomposition, tokens: Tensor, target_pos: int | None, logit_tokens: Sequence[int] | None, ci: Any
) -> tuple[Tensor, int, list[int] | None, dict[str, Tensor], Tensor | None]:
    """Checked (tokens, t*, logit tokens, CI, P(· at t*)); runs the model only when the CI or the tokens are missing."""
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0 or tokens.is_floating_point():
        raise VpdError(f"`tokens` must be an integer tensor of shape (T,) or (1, T); got {tuple(tokens.shape)}.")
    T = tokens.shape[1]
    target_pos = T - 1 if target_pos is None else target_pos
    if not 0 <= target_pos < T:
        raise VpdError(f"`target_pos` must be in [0, {T - 1}] for a {T}-token prompt; got {target_pos}.")
    tokens = tokens[:, : target_pos + 1].to(d.model_device)
    probs = None
    if ci is None or logit_tokens is None:
        with torch.no_grad():
            out, xs = d.model.forward_with_inputs(tokens)
            probs = out.logits[0, target_pos].double().softmax(-1)
            if ci is None:
                ci = {p: g[0] for p, g in d.causal_importance(xs)[0].items()}
        if logit_tokens is None:
            logit_tokens = top_logit_tokens(probs)
    if set(ci) != set(d.module_paths):
        raise VpdError(f"`ci` must have one entry per decomposed module, {d.module_paths}; got {sorted(ci)}.")
    ci = {p: (g[0] if g.ndim == 3 else g)[: target_pos + 1].detach().to(d.model_device) for p, g in ci.items()}
    for p, g in ci.items():
        if g.shape != (target_pos + 1, d.Cs[p]):
            raise VpdError(f"`ci[{p!r}]` must be (T, {d.Cs[p]}) or (1, T, {d.Cs[p]}); got {tuple(g.shape)}.")
    return tokens, target_pos, list(logit_tokens), ci, probs


def top_logit_tokens(probs: Tensor, max_logits: int = 10, logit_prob: float = 0.95) -> list[int]:
    """The likeliest tokens until their cumulative probability reaches `logit_prob`, at most `max_logits`."""
    p, order = probs.sort(descending=True)
    n = int(torch.searchsorted(p.cumsum(0), torch.tensor(logit_prob, dtype=p.dtype, device=p.device))) + 1
    return order[: min(n, max_logits)].tolist()


class _Graph:
    """Node table of every candidate node plus the index tensors that turn leaf gradients into rows of A."""

    def __init__(self, d: Decomposition, T: int, target_pos: int, logit_tokens: list[int], ci: dict[str, Tensor]):
        self.paths = d.module_paths
        device = d.model_device
        ar = torch.arange(T, device=device)
        neg = torch.full((T,), -1, dtype=torch.long, device=device)
        kinds, pos, module, index = [torch.zeros(T, dtype=torch.int8, device=device)], [ar], [neg], [neg]
        self.comp_idx: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # path → (t, c, node index)
        n = T
        for j, p in enumerate(self.paths):
            t_idx, c_idx = (ci[p] > 0).nonzero(as_tuple=True)
            self.comp_idx[p] = (t_idx, c_idx, torch.arange(n, n + len(t_idx), device=device))
            n += len(t_idx)
            kinds.append(torch.full_like(t_idx, KINDS.index("comp"), dtype=torch.int8))
            pos.append(t_idx)
            module.append(torch.full_like(t_idx, j))
            index.append(c_idx)
        self.delta_start = {}
        for j, p in enumerate(self.paths):
            self.delta_start[p] = n
            n += T
            kinds.append(torch.full((T,), KINDS.index("delta"), dtype=torch.int8, device=device))
            pos.append(ar)
            module.append(torch.full((T,), j, dtype=torch.long, device=device))
            index.append(neg)
        self.logit_start = n
        L = len(logit_tokens)
        kinds.append(torch.full((L,), KINDS.index("logit"), dtype=torch.int8, device=device))
        pos.append(torch.full((L,), target_pos, dtype=torch.long, device=device))
        module.append(torch.full((L,), -1, dtype=torch.long, device=device))
        index.append(torch.tensor(logit_tokens, dtype=torch.long, device=device))
        self.kind, self.pos, self.module, self.index = (torch.cat(x) for x in (kinds, pos, module, index))
        self.n = n + L
        self.T, self.target_pos, self.logit_tokens, self.ci = T, target_pos, logit_tokens, ci

    def comp_nodes(self) -> Tensor:
        return (self.kind == KINDS.index("comp")).nonzero().squeeze(1)

    def logit_nodes(self) -> Tensor:
        return torch.arange(self.logit_start, self.n, device=self.kind.device)

    def alive(self) -> dict[str, Tensor]:
        """Path → (T, C) mask of the comp nodes; leaf columns then follow the node order of `comp_idx`."""
        return {p: self.ci[p] > 0 for p in self.paths}

    def bind(self, rec: LeafRecord, weight_by_ci: bool) -> None:
        """Find each comp node's column in its module's leaf and its edge factor a_s (· g_s), once per forward."""
        self.cols: dict[str, Tensor | None] = {}
        self.weight: dict[str, Tensor] = {}
        for p in self.paths:
            t_idx, c_idx, _ = self.comp_idx[p]
            leaf_t, leaf_c = rec.comp_index[p]
            col_of = torch.full(self.ci[p].shape, -1, dtype=torch.long, device=leaf_t.device)
            col_of[leaf_t, leaf_c] = torch.arange(len(leaf_t), device=leaf_t.device)
            cols = col_of[t_idx, c_idx]
            if bool((cols < 0).any()):  # cannot happen for leaves made from `alive()` or for alive=None
                raise RuntimeError(f"the leaves of {p!r} lack some comp nodes of the graph")
            weight = rec.comp_leaves[p][0, cols].detach()
            self.weight[p] = weight * self.ci[p][t_idx, c_idx].to(weight) if weight_by_ci else weight
            # Leaves made from the graph's own alive masks hold exactly its comp nodes, in order.
            same = len(cols) == len(leaf_t) and torch.equal(cols, torch.arange(len(cols), device=cols.device))
            self.cols[p] = None if same else cols

    def source_rows(self, rec: LeafRecord, grads: Sequence[Tensor | None], out: Tensor) -> None:
        """Write the edge weights from every source node for the targets of copies 0..k-1 into `out` (k, n).

        `bind` must have run on `rec`. `out` must hold zeros: a leaf the targets do not reach has no gradient
        (None) and is skipped.
        """
        k = out.shape[0]
        grad_of = {id(leaf): g for leaf, g in zip(rec.leaves(), grads, strict=True)}
        if (g := grad_of[id(rec.emb)]) is not None:
            out[:, : self.T] = (g[:k] * rec.emb[0].detach()).sum(-1)
        for p in self.paths:
            ids, cols = self.comp_idx[p][2], self.cols[p]
            if (g := grad_of[id(rec.comp_leaves[p])]) is not None and len(ids):
                g = g[:k] if cols is None else g[:k, cols]
                out[:, int(ids[0]) : int(ids[-1]) + 1] = g * self.weight[p]  # a path's comp nodes are consecutive
            delta = rec.delta_leaves[p]
            if (g := grad_of[id(delta)]) is not None:
                out[:, self.delta_start[p] : self.delta_start[p] + self.T] = (g[:k] * delta[0].detach()).sum(-1)

    def activation_and_ci(self, rec: LeafRecord, logits: Tensor) -> tuple[Tensor, Tensor]:
        act = logits.new_zeros(self.n)
        ci = logits.new_ones(self.n)
        act[: self.T] = rec.emb[0].detach().norm(dim=-1)
        for p in self.paths:
            t_idx, c_idx, ids = self.comp_idx[p]
            act[ids] = rec.acts[p][0, t_idx, c_idx].detach()
            ci[ids] = self.ci[p][t_idx, c_idx].to(ci)
            act[self.delta_start[p] : self.delta_start[p] + self.T] = rec.delta_leaves[p][0].detach().norm(dim=-1)
        act[self.logit_start :] = logits[0, -1, self.logit_tokens].detach()  # -1 is t*: the prompt ends there
        return act, ci


def _target_sum(
    d: Decomposition, graph: _Graph, rec: LeafRecord, logits: Tensor, chunk: Tensor, copy: Tensor
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


def _slot_groups(d: Decomposition, graph: _Graph) -> tuple[Tensor, Tensor, int] | None:
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

    def __init__(self, d: Decomposition, graph: _Graph, rec: LeafRecord, logits: Tensor, pack: bool):
        self.d, self.graph, self.rec, self.logits = d, graph, rec, logits
        self.K = logits.shape[0]
        self.leaves = rec.leaves()
        self.keys = _slot_groups(d, graph) if pack else None
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


def _choose_and_run(rows: _Rows, graph: _Graph, logit_w: Tensor, K: int, budget: int, progress: bool) -> Tensor:
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
    batch_size: int = 32,
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
        raise VpdError(f"`max_nodes` must be a positive integer or None; got {max_nodes!r}. Pass e.g. 7500.")
    tokens, target_pos, logit_tokens, ci, probs = _prepare(d, tokens, target_pos, logit_tokens, ci)
    graph = _Graph(d, tokens.shape[1], target_pos, logit_tokens, ci)
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


def _run(
    d: Decomposition,
    tokens: Tensor,
    target_pos: int | None,
    logit_tokens: Sequence[int] | None,
    ci: dict[str, Tensor] | None,
    weight_by_source_ci: bool,
    batch_size: int,
    batched: bool,
) -> Attribution:
    table = attribute_edges(
        d,
        tokens,
        target_pos=target_pos,
        logit_tokens=logit_tokens,
        ci=ci,
        weight_by_source_ci=weight_by_source_ci,
        batch_size=batch_size,
        _batched=batched,
    )
    return Attribution(table.nodes(), table.dense(), table.activation, table.ci, table.logit_tokens, table.target_pos)


def attribute(
    d: Decomposition,
    tokens: Tensor,
    *,
    target_pos: int | None = None,
    logit_tokens: Sequence[int] | None = None,
    ci: dict[str, Tensor] | None = None,
    weight_by_source_ci: bool = True,
    batch_size: int = 32,
) -> Attribution:
    """The attribution graph of one prompt, batching `batch_size` target nodes per backward.

    Args:
        d: The decomposition (component model plus CI function).
        tokens: Prompt token ids, (T,) or (1, T). Positions after `target_pos` are dropped.
        target_pos: Read-out position t*; defaults to the last position.
        logit_tokens: Token ids of the logit nodes; default: the top tokens at t* by probability up to a
            cumulative 0.95, at most 10.
        ci: Path → CI (T, C) or (1, T, C); comp nodes are the entries > 0. Default: the CI network's g.
        weight_by_source_ci: Multiply comp-source edges by the source's g (the paper's form).
        batch_size: Target nodes per backward (prompt copies per forward).

    Returns:
        The nodes, the dense adjacency A[target, source], activations and CI per node.

    Raises:
        VpdError: On a misshapen prompt, an out-of-range position or token, a `ci` that does not match
            the decomposed modules, or a `batch_size` below 1.
    """
    return _run(d, tokens, target_pos, logit_tokens, ci, weight_by_source_ci, batch_size, batched=True)


def attribute_reference(
    d: Decomposition,
    tokens: Tensor,
    *,
    target_pos: int | None = None,
    logit_tokens: Sequence[int] | None = None,
    ci: dict[str, Tensor] | None = None,
    weight_by_source_ci: bool = True,
    batch_size: int = 32,
) -> Attribution:
    """`attribute` with one `autograd.grad` per target node on a batch-1 forward (tests, benchmarks).

    Every (t, c) entry is a leaf here, dead or alive, as in the plain formulation; `attribute` makes only
    the alive entries leaves, so agreement between the two also checks that restriction.

    Arguments, return value and errors are those of `attribute`; `batch_size` is validated but unused.
    """
    return _run(d, tokens, target_pos, logit_tokens, ci, weight_by_source_ci, batch_size, batched=False)

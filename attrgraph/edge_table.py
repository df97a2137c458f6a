"""The attribution graph as data: `EdgeTable` (a node table and COO edges, the form every graph takes) and
`Attribution` (a dense matrix, for small graphs and tests); edges run A[target, source] over node indices.
`attrgraph.edges` computes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attrgraph.nodes import KINDS, NodeId


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

    def attribution(self) -> Attribution:
        """The same graph as a dense `Attribution`; for small graphs only (tests, references)."""
        return Attribution(self.nodes(), self.dense(), self.activation, self.ci, self.logit_tokens, self.target_pos)

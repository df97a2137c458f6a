"""Merge subcomponents into components by minimum description length (MDL) on co-firing.

A subcomponent *fires* on a token when its CI exceeds τ. Over N held-out tokens this gives a boolean
firing matrix F (N, n) over the n alive subcomponents (those that fire at least once); each
subcomponent also has a rank cost ρ (1 for a rank-one subcomponent). A partition P of the
subcomponents into K groups describes the data with

    L(P) = Σ_g s_g · (log2 K + α · r_g)

- s_g = the number of tokens on which any member of g fires (the union of its columns of F);
- r_g = Σ_{c ∈ g} ρ_c, the group's rank;
- log2 K bits name each active group on each token, and α · r_g bits pay for the parameters the
  group brings in whenever it is active (α: bits per unit of rank).

Merging lowers the naming cost (fewer groups, and co-firing tokens are named once) but charges a
group's full rank on every token where any member fires. With S = Σ_g s_g and c_ij = |g_i ∩ g_j|
(tokens where both groups fire), merging groups i and j changes the cost by

    ΔL_ij = S · (log2(K−1) − log2 K) − c_ij · log2(K−1) + α · (s_i r_j + s_j r_i − c_ij (r_i + r_j))

because s_{i∪j} = s_i + s_j − c_ij and S drops by c_ij. Two groups that always fire together
(s_i = s_j = c_ij) merge for any α; two that never co-fire merge only if α (s_i r_j + s_j r_i) is below
the saving S · log2(K / (K−1)).

`cluster` merges greedily: repeatedly merge the pair with the most negative ΔL and stop when no
merge lowers L (or after `max_merges`). Candidate pairs are the groups of one matrix
(`within_matrix=True`) or all groups; each block of groups that may merge keeps its group firing
matrix and its exact group co-firing matrix C = FᵀF (counts in float32, exact below 2**24 tokens).
After merging j into i, column i of the group firing matrix becomes g_i ∨ g_j and row i of C becomes
c_ik + |(g_j ∖ g_i) ∩ g_k|, one vector-matrix product over the tokens in g_j ∖ g_i.

Finding the best pair does not rescan all pairs: without the S term, which is the same for every
pair, a pair's score α·D_ij − log2(K−1)·c_ij only grows as K falls (c_ij ≥ 0), so each row's minimum
from an earlier step is a lower bound of its current one. Rows are re-scanned lazily, only when their
bound is the smallest, which gives the exact greedy choice.

Component keys name a subcomponent without a position, in the paper's short form: `1.attn.q:31`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from attrgraph.labels import component_key
from decomposer.errors import VpdError
from decomposer.vpd.run import Decomposition

logger = logging.getLogger(__name__)

_ROW_CHUNK = 1024  # rows of score or co-firing work per vectorised block, to bound memory at large n
_RESCAN = 8192  # pair scores per re-scan of stale rows in the lazy greedy search


@dataclass(frozen=True)
class Firing:
    """Which alive subcomponents fire on which tokens.

    Attributes:
        F: Bool (N, n): F[t, i] is True when column i's subcomponent has CI > `tau` on token t.
        keys: Component key of each column, e.g. `1.attn.q:31`.
        paths: Module path of each column's matrix.
        tau: The firing threshold τ on CI.
        n_total: Subcomponents before dropping the ones that never fire.
    """

    F: Tensor
    keys: list[str]
    paths: list[str]
    tau: float
    n_total: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.F, Tensor) or self.F.ndim != 2 or self.F.dtype != torch.bool:
            raise VpdError(f"`F` must be a bool (N, n) tensor; got {getattr(self.F, 'shape', type(self.F))}.")
        if len(self.keys) != self.F.shape[1] or len(self.paths) != self.F.shape[1]:
            raise VpdError(
                f"`keys` and `paths` need one entry per column of `F` ({self.F.shape[1]}); "
                f"got {len(self.keys)} and {len(self.paths)}."
            )
        if len(set(self.keys)) != len(self.keys):
            raise VpdError("`keys` holds duplicates; each column must be a distinct subcomponent.")


@torch.no_grad()
def firing_matrix(
    d: Decomposition, token_batches: Iterable[Tensor], tau: float = 0.1, *, progress: bool = True
) -> Firing:
    """Stream token batches through the CI network and record which subcomponents fire (CI > `tau`).

    Args:
        d: The decomposition.
        token_batches: (B, T) LongTensors; every position of every row counts as one token.
        tau: Firing threshold on CI, in [0, 1).
        progress: Show a tqdm bar over batches.

    Returns:
        The firing matrix over the subcomponents that fire at least once, columns in module order.

    Raises:
        VpdError: A bad `tau`, a batch that is not a 2-D integer tensor, or no tokens at all.
    """
    from tqdm.auto import tqdm

    if not 0.0 <= tau < 1.0:
        raise VpdError(f"`tau` must be in [0, 1); got {tau}. The paper labels components at CI > 0.1.")
    paths = list(d.module_paths)
    chunks = []
    total = len(token_batches) if isinstance(token_batches, Sequence) else None
    for batch in tqdm(token_batches, desc="firing", total=total, disable=not progress):
        if not isinstance(batch, Tensor) or batch.ndim != 2 or batch.is_floating_point():
            raise VpdError(f"`token_batches` must yield (B, T) integer tensors; got {getattr(batch, 'shape', batch)}.")
        g = d.network_ci(batch)
        chunks.append(torch.cat([(g[p] > tau).flatten(0, -2).cpu() for p in paths], dim=1))
    if not chunks:
        raise VpdError("`token_batches` is empty; pass at least one batch of tokens.")
    fired = torch.cat(chunks)
    alive = fired.any(dim=0)
    columns = [(p, c) for p in paths for c in range(d.Cs[p])]
    kept = [columns[i] for i in alive.nonzero().flatten().tolist()]
    logger.info("firing: %d tokens, %d of %d subcomponents fire at CI > %g", len(fired), len(kept), len(columns), tau)
    return Firing(
        F=fired[:, alive].contiguous(),
        keys=[component_key(p, c) for p, c in kept],
        paths=[p for p, _ in kept],
        tau=tau,
        n_total=len(columns),
    )


def heldout_batches(d: Decomposition, tokenizer: PreTrainedTokenizerBase, n_tokens: int) -> list[Tensor]:
    """Held-out windows (`run_heldout_windows`) in batches of the run's `batch_size`, at least `n_tokens` tokens.

    The count is rounded up to whole windows, and capped by the held-out text available.

    Raises:
        VpdError: `n_tokens` below 1, or no held-out text for this run (see `run_heldout_tokens`).
    """
    from decomposer.vpd.batches import run_heldout_windows

    windows = run_heldout_windows(d.config, tokenizer, target=d.model.target, n_tokens=n_tokens)
    if windows.numel() < n_tokens:
        logger.warning("held-out text has %d windows, fewer than %d tokens' worth", len(windows), n_tokens)
    return list(windows.split(d.config.optim.batch_size))


def description_length(F: Tensor, labels: Sequence[int], rank_costs: Sequence[float], alpha: float) -> float:
    """L(P) of the partition that gives column i the group `labels[i]`, computed from scratch.

    Args:
        F: Bool (N, n) firing matrix.
        labels: Group of each column (any hashable ints).
        rank_costs: Rank cost ρ of each column.
        alpha: Bits per unit of rank.

    Returns:
        Σ_g s_g · (log2 K + α · r_g) in bits.
    """
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    K = len(groups)
    total = 0.0
    for members in groups.values():
        s = int(F[:, members].any(dim=1).sum())
        total += s * (math.log2(K) + alpha * sum(float(rank_costs[i]) for i in members))
    return total


@dataclass(frozen=True)
class MergeStep:
    """One greedy merge: group `b` joins group `a` (groups are named by their first column, a < b)."""

    a: int
    b: int
    delta: float  # ΔL of this merge, < 0
    cost: float  # L(P) after it
    tokens: int  # s of the merged group


@dataclass(frozen=True)
class Clustering:
    """The result of `cluster`.

    Attributes:
        keys: Component key of each column of the firing matrix.
        labels: Cluster id of each column; ids run 0..K−1 in the order of each cluster's first column.
        tokens: s_g of each cluster (tokens on which any member fires), by cluster id.
        ranks: r_g of each cluster, by cluster id.
        history: The merges in order.
        cost_initial: L with every subcomponent in its own group.
        cost: L of the final partition.
        alpha: Bits per unit of rank.
        within_matrix: Whether merges were restricted to one matrix.
        stopped: Why merging ended: "no_gain" (no merge lowers L), "max_merges", "no_candidates" (no two
            groups may merge) or "single_cluster".
        tau: The firing threshold of the data, if known.
        n_tokens: N, the tokens of the firing matrix.
    """

    keys: list[str]
    labels: list[int]
    tokens: list[int]
    ranks: list[float]
    history: list[MergeStep] = field(default_factory=list)
    cost_initial: float = 0.0
    cost: float = 0.0
    alpha: float = 1.0
    within_matrix: bool = True
    stopped: str = "no_gain"
    tau: float | None = None
    n_tokens: int = 0

    @property
    def mapping(self) -> dict[str, int]:
        """Component key → cluster id."""
        return dict(zip(self.keys, self.labels, strict=True))

    @property
    def clusters(self) -> dict[int, list[str]]:
        """Cluster id → member keys, in column order."""
        out: dict[int, list[str]] = {}
        for key, label in zip(self.keys, self.labels, strict=True):
            out.setdefault(label, []).append(key)
        return out


@dataclass
class _Block:
    """The groups that may merge with one another: one matrix's, or all of them.

    Attributes:
        cols: Global column ids of the block's subcomponents (k,); a group is named by its first column.
        G: Bool (N, k): local column l holds the union of the firing of the group named `cols[l]`.
        C: Float32 (k, k) co-firing counts of the groups, exact below 2**24 tokens.
    """

    cols: Tensor
    G: Tensor
    C: Tensor


def _blocks(firing: Firing, within_matrix: bool) -> list[_Block]:
    order: dict[str, int] = {}
    ids = torch.tensor([order.setdefault(p, len(order)) if within_matrix else 0 for p in firing.paths])
    blocks = []
    for m in range(int(ids.max()) + 1):
        cols = (ids == m).nonzero().flatten()
        G = firing.F[:, cols].contiguous()
        C = torch.zeros(len(cols), len(cols), dtype=torch.float32)
        for rows in G.split(_ROW_CHUNK * 4):  # FᵀF in token chunks, to bound the float copy
            x = rows.to(torch.float32)
            C += x.T @ x
        blocks.append(_Block(cols, G, C))
    return blocks


def _check_cluster_args(
    firing: Firing, alpha: float, rank_costs: Sequence[float] | None, max_merges: int | None
) -> Tensor:
    """ρ per column, float64 (n,), after checking every argument of `cluster`."""
    N, n = firing.F.shape
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise VpdError(f"`alpha` must be a positive number of bits per unit of rank; got {alpha!r}. Try 1.0.")
    if max_merges is not None and max_merges < 0:
        raise VpdError(f"`max_merges` must be ≥ 0 or None; got {max_merges}.")
    if n == 0:
        raise VpdError("`firing` has no columns: no subcomponent fires. Lower `tau` or pass more tokens.")
    if N >= 2**24:
        raise VpdError(f"The firing matrix has {N:,} tokens; co-firing counts are exact only below 2**24. Use fewer.")
    r = torch.ones(n, dtype=torch.float64) if rank_costs is None else torch.tensor(rank_costs, dtype=torch.float64)
    if r.shape != (n,) or not bool((r > 0).all()):
        raise VpdError(f"`rank_costs` must hold one positive number per column ({n}); got shape {tuple(r.shape)}.")
    return r


class _Merger:
    """The state of the greedy merging: groups, their sizes s_g and ranks r_g, and each row's best partner.

    A group is named by its first column. `bound[i]` is a lower bound on row i's best merge score, exact when
    `stamp[i]` equals the current K; `best[i]` is the partner that attains it.
    """

    def __init__(self, firing: Firing, r: Tensor, alpha: float, within_matrix: bool) -> None:
        n = firing.F.shape[1]
        self.alpha, self.r = alpha, r
        self.blocks = _blocks(firing, within_matrix)
        self.block_of = torch.empty(n, dtype=torch.long)
        self.local = torch.empty(n, dtype=torch.long)
        self.s = torch.empty(n, dtype=torch.float64)
        for k, blk in enumerate(self.blocks):
            self.block_of[blk.cols] = k
            self.local[blk.cols] = torch.arange(len(blk.cols))
            self.s[blk.cols] = blk.C.diagonal().to(torch.float64)
        self.active = torch.ones(n, dtype=torch.bool)
        self.owner = torch.arange(n)
        # Σ s_g and Σ s_g r_g over the groups, kept in step with every merge.
        self.S, self.SR = float(self.s.sum()), float((self.s * r).sum())
        self.K = n
        self.bound = torch.full((n,), math.inf, dtype=torch.float64)
        self.best = torch.zeros(n, dtype=torch.long)
        self.stamp = torch.full((n,), n, dtype=torch.long)  # the K at which a row's bound was exact
        if n > 1:
            for blk in self.blocks:
                for rows in torch.arange(len(blk.cols)).split(_ROW_CHUNK):
                    value, k = self.scores(blk, rows, math.log2(n - 1)).min(dim=1)
                    self.bound[blk.cols[rows]], self.best[blk.cols[rows]] = value, blk.cols[k]

    def cost(self) -> float:
        """L = log2(K) Σ s_g + α Σ s_g r_g of the current partition."""
        return math.log2(self.K) * self.S + self.alpha * self.SR

    def scores(self, blk: _Block, rows: Tensor, b: float) -> Tensor:
        """α·D − b·c for the local `rows` × all groups of `blk`; non-candidates (self, merged away) are inf."""
        s, r, cols = self.s, self.r, blk.cols
        c = blk.C[rows].to(torch.float64)
        si, ri = s[cols[rows], None], r[cols[rows], None]
        sc = self.alpha * (si * r[cols][None] + s[cols][None] * ri - c * (ri + r[cols][None])) - b * c
        dead = ~self.active[cols][None, :] | (rows[:, None] == torch.arange(len(cols))[None, :])
        return sc.masked_fill(dead, math.inf)

    def best_row(self) -> int:
        """The row whose best merge scores lowest at this K (its bound may be inf: no candidate is left)."""
        K, bound, stamp = self.K, self.bound, self.stamp
        b = math.log2(K - 1)
        # Lazy greedy: a row's bound from an older step is ≤ its current minimum, so the smallest
        # bound that is exact at this K is the global minimum.
        while True:
            i = int(bound.argmin())
            if int(stamp[i]) == K or not math.isfinite(float(bound[i])):
                return i
            # Re-scan row i together with the block's other stale rows of smallest bound: they are
            # likely next, and one vectorised scan costs about as much as one row.
            blk = self.blocks[int(self.block_of[i])]
            stale = (stamp[blk.cols] != K) & self.active[blk.cols]
            n_rows = min(max(1, _RESCAN // len(blk.cols)), int(stale.sum()))
            rows = bound[blk.cols].masked_fill(~stale, math.inf).topk(n_rows, largest=False)
            value, k = self.scores(blk, rows.indices, b).min(dim=1)
            ids = blk.cols[rows.indices]
            bound[ids], self.best[ids], stamp[ids] = value, blk.cols[k], K

    def merge(self, i: int, delta: float) -> MergeStep:
        """Merge row i's group with its best partner into the group of the smaller column; one step of history."""
        s, r = self.s, self.r
        a, j = sorted((i, int(self.best[i])))
        blk = self.blocks[int(self.block_of[a])]
        la, lj = int(self.local[a]), int(self.local[j])
        c_aj = float(blk.C[la, lj])
        # c_{a∪j, k} = c_ak + |(g_j ∖ g_a) ∩ g_k|: one product over the tokens only group j covers.
        only_j = blk.G[:, lj] & ~blk.G[:, la]
        row = blk.C[la] + blk.G[only_j].to(torch.float32).sum(dim=0)
        blk.G[:, la] |= blk.G[:, lj]
        self.SR -= float(s[a] * r[a] + s[j] * r[j])
        self.S -= c_aj
        s[a] = s[a] + s[j] - c_aj
        r[a] = r[a] + r[j]
        self.SR += float(s[a] * r[a])
        row[la] = float(s[a])
        blk.C[la, :] = row
        blk.C[:, la] = row
        self.active[j] = False
        self.owner[self.owner == j] = a
        self.bound[j] = math.inf
        self.K -= 1
        step = MergeStep(a=a, b=j, delta=delta, cost=self.cost(), tokens=int(s[a]))
        if self.K > 1:
            # Row a is new; for every other row k of the block, the pair (k, a) is the only entry that
            # changed, and if it beats k's old bound it is k's exact minimum now.
            new = self.scores(blk, torch.tensor([la]), math.log2(self.K - 1))[0]
            self.bound[a], self.best[a], self.stamp[a] = new.min(), blk.cols[new.argmin()], self.K
            better = new < self.bound[blk.cols]
            cols = blk.cols[better]
            self.bound[cols], self.best[cols], self.stamp[cols] = new[better], a, self.K
        return step


def cluster(
    firing: Firing,
    *,
    alpha: float = 1.0,
    rank_costs: Sequence[float] | None = None,
    within_matrix: bool = True,
    max_merges: int | None = None,
    progress: bool = False,
) -> Clustering:
    """Greedy agglomerative MDL merging of subcomponents (module docstring).

    Args:
        firing: The firing matrix over alive subcomponents, e.g. from `firing_matrix`.
        alpha: Bits per unit of rank, > 0; larger values keep more groups apart.
        rank_costs: ρ per column, > 0; 1 for every rank-one subcomponent by default.
        within_matrix: Only merge groups of the same matrix; otherwise any two groups.
        max_merges: Stop after this many merges (default: until no merge lowers L).
        progress: Show a tqdm bar over merges.

    Returns:
        Cluster labels, the merge history and the costs.

    Raises:
        VpdError: A bad `alpha`, `rank_costs` or `max_merges`, no columns, or 2**24 tokens or more.
    """
    from tqdm.auto import tqdm

    N, n = firing.F.shape
    r = _check_cluster_args(firing, alpha, rank_costs, max_merges)
    m = _Merger(firing, r, alpha, within_matrix)
    cost_initial = m.cost()
    history: list[MergeStep] = []
    limit = n - 1 if max_merges is None else min(max_merges, n - 1)
    stopped = None
    bar = tqdm(total=limit, desc="merge", disable=not progress)
    while len(history) < limit:
        i = m.best_row()
        if not math.isfinite(float(m.bound[i])):
            stopped = "no_candidates"
            break
        delta = m.S * (math.log2(m.K - 1) - math.log2(m.K)) + float(m.bound[i])
        if delta >= 0:
            stopped = "no_gain"
            break
        history.append(m.merge(i, delta))
        bar.update(1)
    bar.close()
    if stopped is None:
        stopped = "max_merges" if len(history) == max_merges else "single_cluster"

    reps = sorted(set(m.owner.tolist()))
    relabel = {rep: k for k, rep in enumerate(reps)}
    logger.info("cluster: %d subcomponents → %d clusters in %d merges (%s)", n, len(reps), len(history), stopped)
    return Clustering(
        keys=list(firing.keys),
        labels=[relabel[o] for o in m.owner.tolist()],
        tokens=[int(m.s[rep]) for rep in reps],
        ranks=[float(m.r[rep]) for rep in reps],
        history=history,
        cost_initial=cost_initial,
        cost=m.cost(),
        alpha=float(alpha),
        within_matrix=within_matrix,
        stopped=stopped,
        tau=firing.tau,
        n_tokens=N,
    )

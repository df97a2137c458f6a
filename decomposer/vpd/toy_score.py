"""Score a toy decomposition against the toy's known mechanisms.

Each decomposed matrix W (nn.Linear layout, (d_out, d_in)) of a toy has ground-truth rank-one pieces, each a
read direction r (d_in,) and a write direction w (d_out,), or is one dense mechanism:

- TMS `W_in`: feature i reads e_i and writes W_in[:, i]; `W_out`: reads W_out[i, :] and writes e_i.
- Residual MLP `mlp_in`: feature i reads its embedding W_E[i] and writes W_in W_E[i].
- Dense: TMS hidden layers and residual-MLP `mlp_out` are each one mechanism that every input uses (the SPD
  paper: the identity splits into as many subcomponents as its rank, and each `mlp_out` into as many as it has
  neurons in use, in no particular basis). We expect that many alive subcomponents, summing to W.

A piece is *recovered* when an alive subcomponent c has |cos(P v_c, r)| > 0.9 and |cos(u_c, w)| > 0.9 and no
other piece claimed c (pieces claim their best subcomponent greedily, most similar first). P projects onto the
span of the matrix's inputs on lone-feature rows: directions that no input ever reaches (most of the residual
MLP's 1000-dimensional stream) are free in a decomposition and are not scored. A subcomponent is *alive* when
its CI exceeds 0.1 on at least one row of the evaluation data or of the one-hot inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from decomposer.vpd.run import Decomposition
from decomposer.vpd.toys import TMS, ResidMLP

COS_THRESHOLD = 0.9
ALIVE_THRESHOLD = 0.1


@dataclass(frozen=True)
class Pieces:
    """The ground truth of one matrix: `kind` is features, neurons or dense (then only `rank` is set)."""

    kind: str
    reads: Tensor | None  # (n, d_in)
    writes: Tensor | None  # (n, d_out)
    rank: int


def input_span(xs: Tensor, tol: float = 1e-4) -> Tensor:
    """Orthonormal basis (k, d_in) of the span of the rows of `xs` (rows, d_in)."""
    _, S, Vh = torch.linalg.svd(xs, full_matrices=False)
    return Vh[S > tol * S.max()]


def ground_truth(target: TMS | ResidMLP, path: str, one_hot_xs: dict[str, Tensor]) -> Pieces:
    """The pieces of matrix `path`; `one_hot_xs` are its inputs on ±1 one-hot rows (for the dense rank)."""
    W = target.get_submodule(path).weight.detach()  # (d_out, d_in)
    if isinstance(target, TMS):
        n = target.n_features
        if path == "W_in":
            return Pieces("features", torch.eye(n), W.T, n)
        if path == "W_out":
            return Pieces("features", W, torch.eye(n), n)
    elif path.endswith("mlp_in"):
        E = target.W_E  # (n, d_embed)
        return Pieces("features", E, E @ W.T, E.shape[0])
    # Dense: the rank W has on the inputs it is given (an mlp_out's dead neurons do not count).
    return Pieces("dense", None, None, int(torch.linalg.matrix_rank(one_hot_xs[path] @ W.T, atol=1e-4)))


def read_downstream(target: TMS | ResidMLP, path: str) -> Tensor | None:
    """Orthonormal basis (k, d_out) of the output directions of matrix `path` that anything after it reads, or
    None when that is all of them.

    A residual-MLP block writes into the 1000-dimensional residual stream, of which only the unembedding (W_Eᵀ,
    the n_features rows of W_E) and the later blocks' `mlp_in` rows are ever read: a decomposition may put
    anything in the other directions, so the dense check compares only what is read.
    """
    if not isinstance(target, ResidMLP):
        return None
    layer = int(path.split(".")[1])
    readers = [target.W_E] + [block.mlp_in.weight for block in target.layers[layer + 1 :]]
    return input_span(torch.cat(readers).detach())


def _abs_cos(a: Tensor, b: Tensor) -> Tensor:
    """|cos| between every row of a (n, d) and every row of b (C, d): (n, C)."""
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).abs()


def match_pieces(V: Tensor, U: Tensor, pieces: Pieces, alive: Tensor, span: Tensor | None = None) -> list[int | None]:
    """For each piece, its distinct alive subcomponent with both |cos| above the threshold, else None.

    `span` (k, d_in), an orthonormal basis, restricts the read directions to the inputs the matrix sees.
    """
    reads = V.T if span is None else (V.T @ span.T) @ span  # (C, d_in)
    similarity = torch.minimum(_abs_cos(pieces.reads, reads), _abs_cos(pieces.writes, U))  # (n, C)
    similarity[:, ~alive] = 0.0
    best = similarity.amax(dim=1)
    found: list[int | None] = [None] * len(best)
    taken: set[int] = set()
    for i in best.argsort(descending=True).tolist():
        row = similarity[i].clone()
        row[list(taken)] = 0.0
        c = int(row.argmax())
        if float(row[c]) > COS_THRESHOLD:
            found[i] = c
            taken.add(c)
    return found


def _mmcs_ml2r(V: Tensor, U: Tensor, pieces: Pieces, alive: Tensor, span: Tensor) -> dict[str, float]:
    """The SPD paper's Table 1 measures: mean over pieces of the largest |cos| between the piece's matrix w rᵀ
    and an alive subcomponent's u_c v_cᵀ (reads projected as in matching), and the mean norm ratio
    ‖u_c v_cᵀ‖ / ‖w rᵀ‖ of that subcomponent."""
    if not bool(alive.any()):
        return {"mmcs": 0.0, "ml2r": 0.0}
    reads = ((V.T @ span.T) @ span)[alive]  # (alive, d_in)
    writes = U[alive]
    cos = _abs_cos(pieces.reads, reads) * _abs_cos(pieces.writes, writes)  # (n, alive): cos of rank-one matrices
    best, c = cos.max(dim=1)
    ratio = (writes[c].norm(dim=1) * reads[c].norm(dim=1)) / (pieces.writes.norm(dim=1) * pieces.reads.norm(dim=1))
    return {"mmcs": float(best.mean()), "ml2r": float(ratio.mean())}


def ci_of(d: Decomposition, x: Tensor) -> dict[str, Tensor]:
    """CI g per path on inputs x (rows, n_features): path → (rows, C)."""
    with torch.no_grad():
        _, xs = d.model.forward_with_inputs(x)
        g, _ = d.causal_importance(xs)
    return g


def score_toy(d: Decomposition, eval_x: Tensor, *, one_hot_value: float) -> dict:
    """Features recovered, one-hot CI, CI-masked MSE and alive counts of a toy decomposition.

    Args:
        d: The decomposition; `d.model.target` is a `TMS` or `ResidMLP`.
        eval_x: Held-out data rows (rows, n_features).
        one_hot_value: The value of the lone active feature in the one-hot CI check.

    Returns:
        A JSON-ready dict: per path `kind`, `pieces`, `recovered`, `alive`, `C`, and for feature matrices
        `ci_diagonal_mean` and `ci_max_off_diagonal`; `active_per_row` (mean subcomponents with CI > 0.1 on
        rows with an active feature); for dense matrices `relative_error_alive_sum` (on what is read
        downstream); overall `mse_ci` (masks = CI, no delta), `mse_zero` (every mask 0, for scale), and
        `matches` (path → subcomponent per piece, or None).
    """
    target = d.model.target
    n = target.n_features
    eye = torch.eye(n)
    with torch.no_grad():
        y, xs = d.model.forward_with_inputs(eval_x)
        g, _ = d.causal_importance(xs)
        y_ci = d.model(eval_x, masks=g)
        y_zero = d.model(eval_x, masks={p: torch.zeros_like(m) for p, m in g.items()})
        _, signed_xs = d.model.forward_with_inputs(torch.cat([eye, -eye]))
    g_one_hot = ci_of(d, one_hot_value * eye)
    result: dict = {"matrices": {}, "matches": {}}
    busy = eval_x.abs().sum(dim=1) > 0  # rows with at least one active feature
    for path in d.module_paths:
        comp = d.model.components(path)
        alive = (torch.cat([g[path], g_one_hot[path]]) > ALIVE_THRESHOLD).any(0)  # (C,)
        pieces = ground_truth(target, path, signed_xs)
        row = {"kind": pieces.kind, "C": comp.C, "alive": int(alive.sum()), "pieces": pieces.rank}
        # How many subcomponents a row needs: dense mechanisms are on for every row with an active feature.
        row["active_per_row"] = float((g[path][busy] > ALIVE_THRESHOLD).sum(dim=1).float().mean())
        span = input_span(signed_xs[path])  # (k, d_in)
        if pieces.kind == "dense":
            # As expected when as many subcomponents are alive as the rank and together they rebuild W (on the
            # inputs it is given).
            W = comp.weight.detach()
            W_alive = torch.einsum("co,ic->oi", comp.U[alive].detach(), comp.V[:, alive].detach())
            read = read_downstream(target, path)
            out = torch.eye(W.shape[0]) if read is None else read  # (k, d_out)
            error = float((out @ (W_alive - W) @ span.T).norm() / (out @ W @ span.T).norm())
            row["relative_error_alive_sum"] = error
            row["recovered"] = pieces.rank if (int(alive.sum()) == pieces.rank and error < 0.1) else 0
            result["matches"][path] = None
        else:
            found = match_pieces(comp.V.detach(), comp.U.detach(), pieces, alive, span)
            row["recovered"] = sum(c is not None for c in found)
            row.update(_mmcs_ml2r(comp.V.detach(), comp.U.detach(), pieces, alive, span))
            result["matches"][path] = found
            if pieces.kind == "features":
                G = g_one_hot[path]  # (feature on, C)
                hits = [(i, c) for i, c in enumerate(found) if c is not None]
                if hits:
                    rows = torch.tensor([i for i, _ in hits])
                    cols = torch.tensor([c for _, c in hits])
                    block = G[:, cols]  # (n, hits): CI of each matched subcomponent on every one-hot input
                    own = block[rows, torch.arange(len(hits))]
                    block = block.clone()
                    block[rows, torch.arange(len(hits))] = float("-inf")
                    row["ci_diagonal_mean"] = float(own.mean())
                    row["ci_max_off_diagonal"] = float(block.max()) if n > 1 else 0.0
        result["matrices"][path] = row
    result["mse_ci"] = float((y_ci - y).pow(2).mean())
    result["mse_zero"] = float((y_zero - y).pow(2).mean())
    return result


def all_recovered(result: dict) -> bool:
    """Whether every feature matrix recovered every one of its features (dense matrices: `dense_as_expected`)."""
    rows = [row for row in result["matrices"].values() if row["kind"] == "features"]
    return all(row["recovered"] == row["pieces"] for row in rows)


def dense_as_expected(result: dict) -> bool:
    """Whether every dense matrix has as many alive subcomponents as its rank, summing to it."""
    rows = [row for row in result["matrices"].values() if row["kind"] == "dense"]
    return all(row["recovered"] == row["pieces"] for row in rows)

"""Score a toy decomposition against the toy's known mechanisms.

Each decomposed matrix W (nn.Linear layout, (d_out, d_in)) of a toy has ground-truth rank-one pieces, each a
read direction r (d_in,) and a write direction w (d_out,):

- TMS `W_in`: feature i reads e_i and writes W_in[:, i]; `W_out`: reads W_out[i, :] and writes e_i.
- Residual MLP `mlp_in`: feature i reads its embedding W_E[i] and writes W_in W_E[i];
  `mlp_out`: neuron j reads e_j and writes W_out[:, j] (only neurons that some feature switches on).
- TMS hidden layers: no preferred pieces ("dense"); we expect as many alive subcomponents as the rank.

A piece is *recovered* when an alive subcomponent c has |cos(v_c, r)| > 0.9 and |cos(u_c, w)| > 0.9 and no
other piece claimed c (pieces claim their best subcomponent greedily, most similar first). A subcomponent is
*alive* when its CI exceeds 0.1 on at least one row of the evaluation data or of the one-hot inputs.
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


def ground_truth(target: TMS | ResidMLP, path: str, one_hot_xs: dict[str, Tensor]) -> Pieces:
    """The pieces of matrix `path`; `one_hot_xs` are its inputs on ±1 one-hot rows (to find used neurons)."""
    W = target.get_submodule(path).weight.detach()  # (d_out, d_in)
    if isinstance(target, TMS):
        n = target.n_features
        if path == "W_in":
            return Pieces("features", torch.eye(n), W.T, n)
        if path == "W_out":
            return Pieces("features", W, torch.eye(n), n)
        return Pieces("dense", None, None, int(torch.linalg.matrix_rank(W)))
    if path.endswith("mlp_in"):
        E = target.W_E  # (n, d_embed)
        return Pieces("features", E, E @ W.T, E.shape[0])
    used = (one_hot_xs[path].amax(0) > 1e-6) & (W.norm(dim=0) > 1e-6)  # (d_mlp,)
    eye = torch.eye(W.shape[1])
    return Pieces("neurons", eye[used], W.T[used], int(used.sum()))


def _abs_cos(a: Tensor, b: Tensor) -> Tensor:
    """|cos| between every row of a (n, d) and every row of b (C, d): (n, C)."""
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).abs()


def match_pieces(V: Tensor, U: Tensor, pieces: Pieces, alive: Tensor) -> list[int | None]:
    """For each piece, its distinct alive subcomponent with both |cos| above the threshold, else None."""
    similarity = torch.minimum(_abs_cos(pieces.reads, V.T), _abs_cos(pieces.writes, U))  # (n, C)
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
        `ci_diagonal_mean` and `ci_max_off_diagonal`; overall `mse_ci` (masks = CI, no delta), `mse_zero`
        (every mask 0, for scale), and `matches` (path → subcomponent per piece, or None).
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
    for path in d.module_paths:
        comp = d.model.components(path)
        alive = (torch.cat([g[path], g_one_hot[path]]) > ALIVE_THRESHOLD).any(0)  # (C,)
        pieces = ground_truth(target, path, signed_xs)
        row = {"kind": pieces.kind, "C": comp.C, "alive": int(alive.sum()), "pieces": pieces.rank}
        if pieces.kind == "dense":
            # Recovered when as many subcomponents are alive as the rank and together they rebuild W.
            W = comp.weight.detach()
            W_alive = torch.einsum("co,ic->oi", comp.U[alive].detach(), comp.V[:, alive].detach())
            error = float((W_alive - W).norm() / W.norm())
            row["relative_error_alive_sum"] = error
            row["recovered"] = pieces.rank if (int(alive.sum()) == pieces.rank and error < 0.1) else 0
            result["matches"][path] = None
        else:
            found = match_pieces(comp.V.detach(), comp.U.detach(), pieces, alive)
            row["recovered"] = sum(c is not None for c in found)
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
    """Whether every feature and neuron matrix recovered every one of its pieces (dense layers are reported apart)."""
    rows = [row for row in result["matrices"].values() if row["kind"] != "dense"]
    return all(row["recovered"] == row["pieces"] for row in rows)

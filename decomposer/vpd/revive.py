"""Reviving dead subcomponents: give a subcomponent whose CI never turns on a piece of W that an input needs.

A subcomponent whose CI sits at the hard sigmoid's floor gets almost no gradient (only the leak α), so once
training has settled which subcomponent handles what, a wrong early choice is hard to undo. On the toys the
common one is a *merged pair*: one subcomponent reads e_i + e_j and is on for both features, and its stray
write is read only by a later subcomponent that is off whenever the pair is on. Splitting it costs nothing in
importance, but it needs a second subcomponent to come alive, which the floor prevents (docs/toys.md).

Every `revive.every` steps (from `start` until `until_frac` of training), per decomposed matrix that
`revive.patterns` matches:

1. the rows whose on subcomponents (CI > 0) leave at least `unexplained` of the matrix output W x out are
   ranked by the norm of what they leave out; rows whose input is within |cos| 0.9 of one already used are
   skipped;
2. each of up to `per_matrix` such rows gives one dead subcomponent (CI < `dead_below` on every row) the
   rank-one piece W x̂ x̂ᵀ (x̂ = x / |x|), split evenly in norm between V and U;
3. its CI network is set to a single ramp that is 0 at half the row's activation and 1 at the full one;
4. AdamW's moments of those entries restart: first moment 0, second the tensor's mean, so the first update
   is not a sign step of full lr size.

This is a training aid in the spirit of dictionary-learning resampling, not part of the VPD objective: the
losses judge every revived piece, and one that does not help dies again.
"""

from __future__ import annotations

import logging
import math
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor

from decomposer.vpd.ci import PerMatrixCI, PerMatrixMLP
from decomposer.vpd.config import ReviveConfig
from decomposer.vpd.run import Decomposition

logger = logging.getLogger(__name__)

# Rows whose inputs are this close to one already used in the same revival give no new direction.
_DISTINCT_COS = 0.9
# Steepness of the CI ramp: its pre-activation runs from −RAMP/2 at a = 0 to RAMP/2 at the row's activation.
RAMP = 6.0


def revival_due(cfg: ReviveConfig, step: int, steps: int) -> bool:
    """Whether `step` (0-based) of a run of `steps` revives."""
    if not cfg.every or step < cfg.start or step > cfg.until_frac * steps:
        return False
    return (step - cfg.start) % cfg.every == 0


def candidate_rows(x: Tensor, weight: Tensor, on_out: Tensor, unexplained: float) -> Tensor:
    """Rows (flattened) whose on subcomponents leave ≥ `unexplained` of W x out, largest |W x − on_out| first.

    Ranking by the norm rather than the fraction puts first the rows where on subcomponents write the wrong
    thing for a large input (a merged pair), ahead of rows whose small feature values are, rightly, not
    important enough to turn anything on (fraction 1, small norm).

    Args:
        x: Inputs of the matrix, (rows, d_in).
        weight: W, (d_out, d_in).
        on_out: What the on subcomponents write for each row, (rows, d_out).
        unexplained: The threshold on |W x − on_out| / |W x|.
    """
    full = x @ weight.T
    norm = full.norm(dim=-1)
    missing = (full - on_out).norm(dim=-1)
    frac = missing / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    qualifies = (frac >= unexplained) & (norm > 1e-6 * norm.max().clamp_min(1e-30))
    order = missing.argsort(descending=True)
    return order[qualifies[order]]


def _set_ramp(net: PerMatrixMLP, c: int, reads: Tensor) -> None:
    """Set subcomponent c's CI network to a ramp: pre = RAMP·(⟨reads, input⟩ − ½), z = gelu(pre)/gelu(RAMP/2).

    `reads` is what the network's input is dotted with so that the revived row gives 1: a scalar
    1/a_row for the `mlp` kind (input a_c), a vector x_row/|x_row|² for `vector_mlp` (input x).
    """
    for param in (net.w_in, net.b_in, net.w_out, net.b_out):
        param[c].zero_()
    net.w_in[c, :, 0] = RAMP * reads
    net.b_in[c, 0] = -RAMP / 2
    net.w_out[c, 0, 0] = 1.0 / F.gelu(torch.tensor(RAMP / 2)).item()


def _restart_moments(opt: torch.optim.Optimizer, param: Tensor, index: tuple) -> None:
    state = opt.state.get(param)
    if state and "exp_avg" in state:
        state["exp_avg"][index] = 0
        state["exp_avg_sq"][index] = state["exp_avg_sq"].mean()


@torch.no_grad()
def revive_dead(d: Decomposition, batch: Tensor, cfg: ReviveConfig, opt: torch.optim.Optimizer | None = None) -> int:
    """Revive dead subcomponents of every matrix on rows of `batch` (see the module docstring).

    Args:
        d: The decomposition; its U, V and per-matrix CI networks are changed in place.
        batch: A training batch.
        cfg: The revival settings.
        opt: The optimiser whose moments of the revived entries restart; None leaves moments alone.

    Returns:
        How many subcomponents were revived.
    """
    assert isinstance(d.ci_fn, PerMatrixCI), "reviving needs one CI network per subcomponent"
    _, xs = d.model.forward_with_inputs(batch)
    g, _ = d.causal_importance(xs)
    revived = 0
    for path in d.module_paths:
        if not any(fnmatchcase(path, pattern) for pattern in cfg.patterns):
            continue
        comp = d.model.components(path)
        g_l = g[path].reshape(-1, comp.C)
        dead = (g_l.max(0).values < cfg.dead_below).nonzero().flatten().tolist()
        if not dead:
            continue
        x = xs[path].reshape(-1, comp.d_in).to(comp.V.dtype)
        on_out = (comp.component_acts(x) * (g_l > 0).to(x.dtype)) @ comp.U
        net = d.ci_fn.network(path)
        used: list[Tensor] = []
        for row in candidate_rows(x, comp.weight, on_out, cfg.unexplained).tolist():
            if len(used) == cfg.per_matrix or not dead:
                break
            x_hat = x[row] / x[row].norm()
            if any(float((x_hat @ u).abs()) > _DISTINCT_COS for u in used):
                continue
            used.append(x_hat)
            c = dead.pop(0)
            write = comp.weight @ x_hat  # the piece W x̂ x̂ᵀ, applied to x̂
            scale = math.sqrt(float(write.norm()) + 1e-12)
            comp.V[:, c] = x_hat * scale
            comp.U[c, :] = write / scale
            a_row = float(x[row].norm()) * scale
            reads = torch.tensor([1.0 / a_row]) if net.kind == "mlp" else x[row] / float(x[row].norm()) ** 2
            _set_ramp(net, c, reads.to(net.w_in))
            if opt is not None:
                for param, index in ((comp.V, (slice(None), c)), (comp.U, (c,))):
                    _restart_moments(opt, param, index)
                for param in (net.w_in, net.b_in, net.w_out, net.b_out):
                    _restart_moments(opt, param, (c,))
            revived += 1
    if revived:
        logger.info("decompose: revived %d dead subcomponents", revived)
    return revived

"""How far an edited model moved from its target (docs/attribution-graphs.md §11).

Efficacy P(o) at the positions where the edited subcomponent fires, and KL(p_target ‖ p_edited) on the ±window
tokens around them (D_KL,Surrounding) and on non-firing tokens across the text (D_KL,Global). Both the
subcomponent edit (`circuits.edit`) and its LoRA baseline (`circuits.edit.lora`) are scored here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decomposer.errors import VpdError


@dataclass(frozen=True)
class EditMetrics:
    """The three numbers of docs/attribution-graphs.md §11, with the counts behind them.

    Attributes:
        efficacy: Mean P_edited(o) at the firing positions.
        efficacy_target: Mean P_target(o) at the same positions, for reference.
        kl_surrounding: Mean KL(p_target ‖ p_edited) on the ±window tokens around firing positions, firing
            positions excluded (NaN where there are none).
        kl_global: Mean KL(p_target ‖ p_edited) on the sampled non-firing positions.
        n_firing, n_surrounding, n_global: Positions behind each mean.
    """

    efficacy: float
    efficacy_target: float
    kl_surrounding: float
    kl_global: float
    n_firing: int
    n_surrounding: int
    n_global: int


def surrounding_mask(firing: Tensor, window: int) -> Tensor:
    """Positions within ±`window` of a firing position in the same row, firing positions excluded; (batch, seq) bool."""
    if window <= 0:
        return torch.zeros_like(firing, dtype=torch.bool)
    near = F.max_pool1d(firing[:, None].double(), kernel_size=2 * window + 1, stride=1, padding=window)[:, 0]
    return (near > 0) & ~firing


def position_stats(target_logits: Tensor, edited_logits: Tensor, token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per position: KL(p_target ‖ p_edited), P_target(o), P_edited(o); each (batch, seq), float64."""
    logp_t = torch.log_softmax(target_logits.double(), -1)
    logp_e = torch.log_softmax(edited_logits.double(), -1)
    p_t = logp_t.exp()
    # 0 · log 0 = 0: a token the target rules out contributes nothing, whatever the edited model says.
    kl = torch.where(p_t > 0, p_t * (logp_t - logp_e), torch.zeros_like(p_t)).sum(-1)
    return kl, p_t[..., token_id], logp_e[..., token_id].exp()


def check_firing(firing: Tensor, shape: tuple[int, ...]) -> None:
    """Raise unless `firing` is a bool mask of `shape` that selects at least one position."""
    if firing.dtype != torch.bool or tuple(firing.shape) != tuple(shape):
        raise VpdError(
            f"`firing_mask` must be a bool tensor of shape {tuple(shape)}; got {firing.dtype} {tuple(firing.shape)}."
        )
    if not firing.any():
        raise VpdError(
            "`firing_mask` selects no position, so efficacy is undefined; pass text where the subcomponent fires."
        )


def metrics_from_stats(
    kl: Tensor,
    p_target: Tensor,
    p_edited: Tensor,
    firing: Tensor,
    *,
    window: int = 20,
    n_global: int | None = None,
    seed: int = 0,
) -> EditMetrics:
    """Aggregate per-position stats of `position_stats` into `EditMetrics`.

    Args:
        kl, p_target, p_edited: (batch, seq) per-position values.
        firing: Bool (batch, seq), where the subcomponent fires.
        window: Half-width of the surrounding windows.
        n_global: Non-firing positions sampled uniformly (seeded) for D_KL,Global; None uses them all.
        seed: Seed of that sample.
    """
    check_firing(firing, tuple(kl.shape))
    around = surrounding_mask(firing, window)
    rest = torch.nonzero((~firing).flatten()).flatten()
    if n_global is not None and n_global < len(rest):
        rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:n_global]]
    n_around = int(around.sum())
    return EditMetrics(
        efficacy=float(p_edited[firing].mean()),
        efficacy_target=float(p_target[firing].mean()),
        kl_surrounding=float(kl[around].mean()) if n_around else float("nan"),
        kl_global=float(kl.flatten()[rest].mean()) if len(rest) else float("nan"),
        n_firing=int(firing.sum()),
        n_surrounding=n_around,
        n_global=len(rest),
    )


@torch.no_grad()
def edit_metrics(
    target: nn.Module,
    edited: nn.Module,
    ids: Tensor,
    firing_mask: Tensor,
    token_id: int,
    window: int = 20,
    *,
    n_global: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
) -> EditMetrics:
    """Efficacy, D_KL,Surrounding and D_KL,Global of `edited` against `target` on `ids` (batch, seq).

    Args:
        target: The unedited model; it returns `.logits`.
        edited: The edited model.
        ids: Token ids (batch, seq).
        firing_mask: Bool (batch, seq), where the edited subcomponent fires (CI > τ).
        token_id: The token o whose probability the edit raises.
        window: Half-width of the surrounding windows (the paper: 20).
        n_global: Non-firing positions sampled for D_KL,Global; None uses all of them.
        seed: Seed of that sample.
        batch_size: Sequences per forward pass.

    Raises:
        VpdError: `firing_mask` has the wrong shape or selects nothing.
    """
    check_firing(firing_mask, tuple(ids.shape))
    device = next(target.parameters()).device
    stats = [
        position_stats(target(chunk.to(device)).logits, edited(chunk.to(device)).logits, token_id)
        for chunk in ids.split(batch_size)
    ]
    kl, p_t, p_e = (torch.cat([s[i] for s in stats]).cpu() for i in range(3))
    return metrics_from_stats(kl, p_t, p_e, firing_mask, window=window, n_global=n_global, seed=seed)


@dataclass(frozen=True)
class EditPoint:
    """The edit at one α and its metrics."""

    alpha: float
    metrics: EditMetrics

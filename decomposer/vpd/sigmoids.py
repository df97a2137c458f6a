"""Leaky hard sigmoids that turn CI pre-activations z into causal importances (docs/method.md §5.3).

Both functions read the same z:

- `sigmoid_lower` gives g, used for every mask. Forward clamp(z, 0, 1); custom backward with G = ∂L/∂g:

  | region                | ∂L/∂z |
  |-----------------------|-------|
  | 0 < z ≤ 1             | G     |
  | z > 1                 | 0     |
  | z ≤ 0 and G < 0       | α·G   |
  | z ≤ 0 and G ≥ 0       | 0     |

  The boundaries belong to the rows as written: z = 0 is in "z ≤ 0", z = 1 is in "0 < z ≤ 1".
- `sigmoid_upper` gives g_up, used only by the minimality losses: clamp(z, 0, 1) for z ≤ 1 and
  1 + α(z − 1) above, with plain autograd (gradient exactly 0 for z ≤ 0, 1 on (0, 1], α above 1).

`sigmoid_lower_spd` is the older [SPD] variant that leaks in the forward too (masks can go negative).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from decomposer.errors import VpdError

DEFAULT_ALPHA = 0.01


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise VpdError(f"`alpha` must be in [0, 1); got {alpha}. Pass a small leak slope such as 0.01.")


class LowerLeakyHardSigmoid(torch.autograd.Function):
    """σ_lower: forward clamp(z, 0, 1), straight-through backward that leaks only upward below zero.

    Below zero only gradients that would *raise* g pass (scaled by α), so a dead subcomponent can
    revive when reconstruction wants it, without a pressure that drives z to −∞.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.alpha = alpha
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad_g: Tensor) -> tuple[Tensor, None]:
        (z,) = ctx.saved_tensors
        zero = torch.zeros_like(grad_g)
        leak = torch.where(grad_g < 0, ctx.alpha * grad_g, zero)  # only the direction that raises g
        grad_z = torch.where(z <= 0, leak, torch.where(z <= 1, grad_g, zero))
        return grad_z, None


def sigmoid_lower(z: Tensor, alpha: float = DEFAULT_ALPHA) -> Tensor:
    """Causal importance g for masks: clamp(z, 0, 1) with the [VPD] leaky backward.

    Args:
        z: CI pre-activations, any shape.
        alpha: Leak slope applied to upward gradients where z ≤ 0.

    Returns:
        g in [0, 1], same shape and dtype as `z`.

    Raises:
        VpdError: `alpha` is outside [0, 1).
    """
    _check_alpha(alpha)
    return LowerLeakyHardSigmoid.apply(z, alpha)


def sigmoid_upper(z: Tensor, alpha: float = DEFAULT_ALPHA) -> Tensor:
    """Causal importance g_up for the minimality losses: clamp(z, 0, 1), leaking with slope α above 1.

    Built from `torch.where` rather than `clamp`, because clamp's gradient is 1 at z = 0 and the
    minimality gradient must be exactly 0 for every z ≤ 0 (docs/method.md §8.4).

    Args:
        z: CI pre-activations, any shape.
        alpha: Slope above z = 1.

    Returns:
        g_up ≥ 0, same shape and dtype as `z`.

    Raises:
        VpdError: `alpha` is outside [0, 1).
    """
    _check_alpha(alpha)
    above = 1.0 + alpha * (z - 1.0)
    return torch.where(z > 1, above, torch.where(z > 0, z, torch.zeros_like(z)))


def sigmoid_lower_spd(z: Tensor, alpha: float = DEFAULT_ALPHA) -> Tensor:
    """[SPD] lower sigmoid: slope α below zero in the forward as well, clamped at 1 above.

    Masks built from it can go slightly negative; VPD dropped it for that reason (docs/method.md §5.3).
    Plain autograd: gradient α for z ≤ 0, 1 on (0, 1], 0 above 1.

    Args:
        z: CI pre-activations, any shape.
        alpha: Leak slope below zero.

    Returns:
        g ≤ 1, same shape and dtype as `z`.

    Raises:
        VpdError: `alpha` is outside [0, 1).
    """
    _check_alpha(alpha)
    return torch.where(z > 1, torch.ones_like(z), torch.where(z > 0, z, alpha * z))

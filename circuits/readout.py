"""Reading an intervened forward against the target's: P(y*) at t*, the KL per position, `InterventionResult`.

Log-probabilities are taken in at least fp32 (`log_probs_fp32`), since bf16 is too coarse for small
probabilities and KLs. `readout` resolves (t*, y*) per row: a missing t* is the last position, a missing y*
the target's top token there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from decomposer.errors import VpdError


@dataclass(frozen=True)
class InterventionResult:
    """Logits of one intervened forward next to the target's.

    Attributes:
        logits: (B, T, vocab) under the intervention.
        target_logits: (B, T, vocab) of the unmodified target.
        kl: (B, T) KL(target ‖ intervened) per position, in nats.
        target_pos: (B,) read-out position t*, or None when no target was asked for.
        target_token: (B,) label y*, or None.
        p_target: (B,) P(y*) at t* under the target, or None.
        p_intervened: (B,) P(y*) at t* under the intervention, or None.
    """

    logits: Tensor
    target_logits: Tensor
    kl: Tensor
    target_pos: Tensor | None = None
    target_token: Tensor | None = None
    p_target: Tensor | None = None
    p_intervened: Tensor | None = None


def log_probs_fp32(logits: Tensor) -> Tensor:
    """Log-softmax in at least fp32: bf16 log-probabilities are too coarse for small probabilities and KLs."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


def kl_per_position(target_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(target_logits) ‖ softmax(logits)) over the last dimension, in nats."""
    lp, lq = log_probs_fp32(target_logits), log_probs_fp32(logits)
    return (lp.exp() * (lp - lq)).sum(-1)


def _per_row(name: str, value: int | Sequence[int] | Tensor, B: int) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.long).flatten().cpu()
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise VpdError(f"`{name}` must be one int or one per row ({B}); got {t.numel()} values.")
    return t.clone()


def readout(
    target_logits: Tensor, target_pos: int | Sequence[int] | None, target_token: int | Sequence[int] | None
) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """(t*, y*) per row; a missing t* is the last position, a missing y* the target's top token at t*."""
    if target_pos is None and target_token is None:
        return None, None
    B, T, vocab = target_logits.shape
    pos = _per_row("target_pos", T - 1 if target_pos is None else target_pos, B)
    if ((pos < -T) | (pos >= T)).any():
        raise VpdError(f"`target_pos` must be in [{-T}, {T}) for {T}-token prompts; got {pos.tolist()}.")
    pos = pos % T
    if target_token is None:
        dev = target_logits.device
        tok = target_logits[torch.arange(B, device=dev), pos.to(dev)].argmax(-1).cpu()
    else:
        tok = _per_row("target_token", target_token, B)
        if ((tok < 0) | (tok >= vocab)).any():
            raise VpdError(f"`target_token` must be in [0, {vocab}), the vocabulary; got {tok.tolist()}.")
    return pos, tok


def intervention_result(
    target_logits: Tensor, logits: Tensor, target_pos: Any, target_token: Any
) -> InterventionResult:
    """The `InterventionResult` of one intervened forward: the KL per position, and P(y*) at t* when asked for."""
    pos, tok = readout(target_logits, target_pos, target_token)
    kl = kl_per_position(target_logits, logits)
    if pos is None:
        return InterventionResult(logits, target_logits, kl)
    dev = logits.device
    rows = torch.arange(len(pos), device=dev)
    p_t = log_probs_fp32(target_logits[rows, pos.to(dev)]).exp()[rows, tok.to(dev)]
    p_i = log_probs_fp32(logits[rows, pos.to(dev)]).exp()[rows, tok.to(dev)]
    return InterventionResult(logits, target_logits, kl, pos, tok, p_t, p_i)

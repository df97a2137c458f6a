"""Pure loss terms and schedules of the VPD objective (docs/method.md §6–§9).

The coefficients that combine these terms live with the trainer; this module only computes them:

- `kl_divergence`: KL(softmax(y*) ‖ softmax(y)) per position, mean over positions, in fp32 (§7).
- `mse_output_loss`: the [SPD] toy-model reconstruction loss.
- `faithfulness_loss`: L_Δ = Σ_l ‖Δ_l‖²_F / Σ_l numel(W_l) (§8.1).
- `importance_minimality`, `frequency_minimality`, `minimality_loss`: L_imp and L_freq (§8.4, §8.5).
- `p_schedule`, `cosine_lr`: the p anneal and the lr schedule (§8.4, §9).
- `mask_from_sources`: m = g + (1 − g)·r (§6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from decomposer.errors import VpdError


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise VpdError(
            f"`{name_a}` has shape {tuple(a.shape)} but `{name_b}` has shape {tuple(b.shape)}. "
            "Pass tensors of one shape."
        )


def kl_divergence(target_logits: Tensor, logits: Tensor) -> Tensor:
    """Mean over positions of KL(softmax(target_logits) ‖ softmax(logits)), summed over the last dim.

    Computed in float32 whatever the input dtype, because bf16 log-probabilities lose the small
    differences that the reconstruction losses are made of. Gradients reach both arguments; detach
    the target yourself (the clean forward already runs without grad).

    Args:
        target_logits: y*, shape (..., vocab).
        logits: y, same shape.

    Returns:
        Float32 scalar.

    Raises:
        VpdError: The shapes differ or the tensors have no vocabulary dimension.
    """
    _check_same_shape("target_logits", target_logits, "logits", logits)
    if target_logits.ndim == 0:
        raise VpdError("`target_logits` is a scalar. Pass logits of shape (..., vocab).")
    log_p = target_logits.float().log_softmax(dim=-1)
    log_q = logits.float().log_softmax(dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (...)
    return per_position.mean()


def mse_output_loss(target: Tensor, output: Tensor) -> Tensor:
    """[SPD] toy reconstruction loss: mean squared error over every element, in float32.

    Raises:
        VpdError: `target` and `output` differ in shape.
    """
    _check_same_shape("target", target, "output", output)
    return (output.float() - target.float()).pow(2).mean()


def faithfulness_loss(deltas: Sequence[Tensor]) -> Tensor:
    """L_Δ: the summed squared Frobenius norm of every weight delta over the total number of weights.

    Args:
        deltas: Δ_l = W_l − Ŵ_l for every decomposed matrix, with grad.

    Returns:
        Float32 scalar.

    Raises:
        VpdError: `deltas` is empty.
    """
    if len(deltas) == 0:
        raise VpdError("`deltas` is empty. Pass one weight delta per decomposed matrix.")
    total = sum(delta.float().pow(2).sum() for delta in deltas)
    return total / sum(delta.numel() for delta in deltas)


class ImportanceMinimality(NamedTuple):
    """L_imp and the per-component firing measure it sums."""

    loss: Tensor  # scalar Σ_l Σ_c f_c^l
    f: list[Tensor]  # per matrix, f_c = Σ_positions (g_up + ε)^p / N, shape (C,), with grad


class MinimalityLosses(NamedTuple):
    """The two minimality terms; their sum is upstream's fused "ImportanceMinimality" value."""

    importance: Tensor  # L_imp = Σ_l Σ_c f_c^l
    frequency: Tensor  # β · L_freq = β · Σ_l Σ_c f_c^l log2(1 + N_ref f_c^l), already scaled by β


def importance_minimality(g_up: Sequence[Tensor], p: float, eps: float) -> ImportanceMinimality:
    """L_imp = Σ_l Σ_c f_c^l with f_c^l = Σ_positions (g_up^l + ε)^p / N_l (docs/method.md §8.4).

    Components are summed over all matrices without normalising by L, as upstream does. The gradient
    with respect to g_up is p(g_up + ε)^(p−1), finite whenever ε > 0; where g_up came from z ≤ 0,
    `sigmoid_upper` contributes an exact 0 on the way back to z.

    Args:
        g_up: One tensor of shape (..., C) per matrix; all leading dims are positions.
        p: Exponent, > 0 (annealed by `p_schedule`).
        eps: Added before the power; must be > 0 when p < 1, where the gradient at 0 is otherwise infinite.

    Returns:
        The loss as a float32 scalar, and the per-matrix f of shape (C,).

    Raises:
        VpdError: `g_up` is empty, `p` ≤ 0, `eps` < 0, or `eps` is 0 with `p` < 1.
    """
    if len(g_up) == 0:
        raise VpdError("`g_up` is empty. Pass one upper causal-importance tensor of shape (..., C) per matrix.")
    if p <= 0:
        raise VpdError(f"`p` must be > 0; got {p}. Pass an exponent such as 2.0 (annealed towards 0.4).")
    if eps < 0 or (eps == 0 and p < 1):
        raise VpdError(f"`eps` must be > 0 when `p` < 1, and never negative; got {eps} (p={p}). Pass 1e-12 or 1e-6.")
    f_list = []
    for g in g_up:
        if g.ndim == 0 or g.numel() == 0:
            raise VpdError(f"Each `g_up` tensor needs shape (..., C) with at least one position; got {tuple(g.shape)}.")
        n_positions = g.numel() // g.shape[-1]
        # fp32: eps and long sums over positions both vanish in bf16.
        f_list.append((g.float() + eps).pow(p).reshape(-1, g.shape[-1]).sum(dim=0) / n_positions)  # (C,)
    loss = sum(f.sum() for f in f_list)
    return ImportanceMinimality(loss, f_list)


def frequency_minimality(f_list: Sequence[Tensor], n_ref: float) -> Tensor:
    """L_freq = Σ_l Σ_c f_c^l · log2(1 + N_ref · f_c^l), with gradients through both factors (§8.5).

    N_ref · f estimates the global Σ_{b,t} (g_up + ε)^p, which keeps the term batch-size invariant.

    Args:
        f_list: Per-matrix f from `importance_minimality`.
        n_ref: Reference token count, the global tokens per step (64·512 = 32,768 in the paper).

    Returns:
        Float32 scalar.

    Raises:
        VpdError: `f_list` is empty or `n_ref` ≤ 0.
    """
    if len(f_list) == 0:
        raise VpdError("`f_list` is empty. Pass the per-matrix f returned by `importance_minimality`.")
    if n_ref <= 0:
        raise VpdError(f"`n_ref` must be > 0; got {n_ref}. Pass the global number of tokens per step, e.g. 32768.")
    return sum((f * (1.0 + n_ref * f).log2()).sum() for f in f_list)


def minimality_loss(g_up: Sequence[Tensor], p: float, eps: float, beta: float, n_ref: float) -> MinimalityLosses:
    """Both minimality terms from the same f: L_imp, and L_freq already scaled by `beta`.

    `importance + frequency` equals Σ f(1 + β log2(1 + N_ref f)), upstream's fused form, so the trainer
    multiplies the sum by the importance coefficient alone (β = 0.5 for the paper's 2e-4 / 1e-4).

    Args:
        g_up: One tensor of shape (..., C) per matrix.
        p: Exponent, > 0.
        eps: Added before the power.
        beta: Weight of the frequency term relative to importance, ≥ 0; 0 skips it.
        n_ref: Reference token count for the frequency term.

    Returns:
        `MinimalityLosses(importance, frequency)`, float32 scalars.

    Raises:
        VpdError: Invalid `g_up`, `p`, `eps`, `n_ref`, or a negative `beta`.
    """
    if beta < 0:
        raise VpdError(f"`beta` must be ≥ 0; got {beta}. Pass 0.5 as in the paper, or 0 for no frequency term.")
    importance, f_list = importance_minimality(g_up, p, eps)
    if beta == 0:
        return MinimalityLosses(importance, importance.new_zeros(()))
    return MinimalityLosses(importance, beta * frequency_minimality(f_list, n_ref))


def step_progress(step: int, total_steps: int) -> float:
    """Validate a step and return its progress step / (total_steps − 1) in [0, 1]."""
    if total_steps < 1:
        raise VpdError(f"`total_steps` must be ≥ 1; got {total_steps}. Pass the number of training steps.")
    if not 0 <= step < total_steps:
        raise VpdError(f"`step` must be in [0, {total_steps}); got {step}. Pass a 0-based step below `total_steps`.")
    return step / max(total_steps - 1, 1)


def p_schedule(
    step: int,
    total_steps: int,
    p_start: float = 2.0,
    p_end: float | None = 0.4,
    start_frac: float = 0.0,
    end_frac: float = 1.0,
) -> float:
    """Minimality exponent p at `step`: p_start until `start_frac`, linear to p_end at `end_frac`, then p_end.

    The fractions are of the run measured as step / (total_steps − 1), so the last step reaches p_end.

    Args:
        step: 0-based training step.
        total_steps: Number of training steps.
        p_start: p before the anneal, > 0.
        p_end: p after the anneal, > 0; None keeps p at p_start throughout.
        start_frac: Fraction of the run where the anneal starts.
        end_frac: Fraction of the run where it ends, ≥ start_frac.

    Returns:
        The exponent p.

    Raises:
        VpdError: A step outside [0, total_steps), a non-positive p, or fractions outside 0 ≤ start ≤ end ≤ 1.
    """
    progress = step_progress(step, total_steps)
    if p_start <= 0 or (p_end is not None and p_end <= 0):
        raise VpdError(f"`p_start` and `p_end` must be > 0; got {p_start} and {p_end}. Pass e.g. 2.0 and 0.4.")
    if not 0.0 <= start_frac <= end_frac <= 1.0:
        raise VpdError(
            f"`start_frac` and `end_frac` must satisfy 0 ≤ start_frac ≤ end_frac ≤ 1; got {start_frac} and {end_frac}."
        )
    if p_end is None or progress <= start_frac:
        return p_start
    if progress >= end_frac:
        return p_end
    t = (progress - start_frac) / (end_frac - start_frac)
    return p_start + t * (p_end - p_start)


def cosine_lr(step: int, total_steps: int, lr0: float, final_frac: float = 0.1, warmup_steps: int = 0) -> float:
    """Learning rate at `step`: optional linear warm-up from 0, then cosine from lr0 down to final_frac·lr0.

    Without warm-up this is lr0 · (f + (1 − f) · ½(1 + cos(π · step / (steps − 1)))) (docs/method.md §9).
    With warm-up, step s < W gives lr0 · s / W and the cosine runs over the remaining steps, still
    ending at final_frac·lr0 on the last step.

    Args:
        step: 0-based training step.
        total_steps: Number of training steps.
        lr0: Peak learning rate.
        final_frac: Final lr as a fraction of lr0, in [0, 1].
        warmup_steps: Length of the linear warm-up, in [0, total_steps).

    Returns:
        The learning rate.

    Raises:
        VpdError: A step outside [0, total_steps), `final_frac` outside [0, 1], or a bad `warmup_steps`.
    """
    step_progress(step, total_steps)
    if not 0.0 <= final_frac <= 1.0:
        raise VpdError(f"`final_frac` must be in [0, 1]; got {final_frac}. Pass 0.1 to end at a tenth of lr0.")
    if not 0 <= warmup_steps < total_steps:
        raise VpdError(f"`warmup_steps` must be in [0, {total_steps}); got {warmup_steps}. Pass 0 for no warm-up.")
    if step < warmup_steps:
        return lr0 * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps - 1, 1)
    return lr0 * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def mask_from_sources(g: Tensor, r: Tensor) -> Tensor:
    """Subcomponent mask m = g + (1 − g)·r: g = 1 pins it at 1, g = 0 leaves it free at r (docs/method.md §6).

    Args:
        g: Causal importance from `sigmoid_lower`, in [0, 1].
        r: Sources in [0, 1] (uniform samples or adversarial), broadcastable to `g`.

    Returns:
        The mask, broadcast shape of `g` and `r`.
    """
    return g + (1.0 - g) * r

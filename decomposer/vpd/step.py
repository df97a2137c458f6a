"""One VPD training step (docs/method.md §9.1).

1. Clean target forward with every decomposed matrix's input cached; y* detached.
2. CI from the cached inputs: g = σ_lower(z) gates masks, g_up = σ_upper(z) feeds minimality.
3. L_Δ = Σ‖W − Ŵ‖² / Σ numel, with Δ recomputed with gradient.
4. Stochastic reconstruction: m = g + (1 − g)·r, r ~ U(0, 1), m_Δ ~ U(0, 1), uniform-k routing.
5. Adversarial reconstruction: PPGD takes its warm-up ascents with g detached, then L_adv is built
   from its sources and the live g (or fresh PGD re-draws shared sources each step).
6. Importance and frequency minimality at the scheduled p.
7. total.backward(), gradients averaged across ranks, U/V clipped, AdamW step, then PPGD's third
   ascent with ∂L_adv/∂s from the same backward (the sources are leaves that only L_adv reads).

When the config turns revival on, a step it falls on first revives dead subcomponents (revive.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from decomposer.vpd.adversary import PersistentPGD, fresh_pgd, fresh_pgd_sources
from decomposer.vpd.losses import (
    cosine_lr,
    faithfulness_loss,
    kl_divergence,
    mask_from_sources,
    minimality_loss,
    mse_output_loss,
    p_schedule,
)
from decomposer.vpd.revive import revival_due, revive_dead
from decomposer.vpd.routing import uniform_k_routing
from decomposer.vpd.run import Decomposition

GradReducer = Callable[[list[Tensor]], None]


@dataclass(frozen=True)
class StepLog:
    """Scalars of one step; `total` is the optimised objective."""

    step: int
    total: float
    faithfulness: float
    stochastic: float
    adversarial: float
    importance: float
    frequency: float
    p: float
    lr: float
    l0: float


def output_of(out) -> Tensor:
    """Logits of a HF output, or the tensor a plain module returns."""
    return out.logits if hasattr(out, "logits") else out


def reconstruction(kind: str, target: Tensor, output: Tensor) -> Tensor:
    return kl_divergence(target, output) if kind == "kl" else mse_output_loss(target, output)


def routing_masks(
    d: Decomposition, kind: str, leading: tuple[int, ...], generator: torch.Generator
) -> dict[str, Tensor] | None:
    """Path → bool routing of shape `leading`, from (L, B, T) draws; toy batches (B,) use T = 1.

    Routing everything returns None, which the masked forward reads the same way without a `where` per matrix.
    """
    if kind == "all":
        return None
    L = len(d.module_paths)
    B, T = (leading[0], 1) if len(leading) == 1 else leading
    rho = uniform_k_routing(L, B, T, generator=generator, device=generator.device)
    device = d.model_device
    return {p: rho[i].reshape(leading).to(device) for i, p in enumerate(d.module_paths)}


def stochastic_masks(
    g: dict[str, Tensor], leading: tuple[int, ...], generator: torch.Generator, *, binomial: bool = False
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """m = g + (1 − g)·r per matrix and m_Δ ~ U(0, 1) per (matrix, position)."""
    masks, delta_masks = {}, {}
    for p, g_l in g.items():
        r = torch.rand(g_l.shape, generator=generator, device=generator.device).to(g_l.device)
        if binomial:
            r = (r < 0.5).to(g_l.dtype)
        masks[p] = mask_from_sources(g_l, r)
        delta_masks[p] = torch.rand(leading, generator=generator, device=generator.device).to(g_l.device)
    return masks, delta_masks


class Trainer:
    """Optimiser, adversary and RNG of a run; `step(batch, step)` performs one training step."""

    def __init__(
        self,
        d: Decomposition,
        *,
        n_ref: float,
        generator: torch.Generator,
        reduce_grads: GradReducer | None = None,
        reduce_source_grad: Callable[[Tensor], Tensor] | None = None,
        broadcast: Callable[[Tensor], None] | None = None,
    ) -> None:
        cfg = d.config
        self.d = d
        self.n_ref = n_ref
        self.generator = generator
        self.reduce_grads = reduce_grads
        self.reduce_source_grad = reduce_source_grad
        self.broadcast = broadcast
        self.uv, self.ci_params = d.trainable_parameters()
        self.opt = torch.optim.AdamW(
            [{"params": self.uv}, {"params": self.ci_params}], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        self.ppgd = (
            PersistentPGD(d.Cs, cfg.adversary, cfg.optim.steps, generator=generator)
            if cfg.adversary.kind == "ppgd"
            else None
        )

    def _shared_sources(self, g: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Across ranks, shared PGD sources start equal: drawn on rank 0 and broadcast (docs/method.md §11)."""
        if self.broadcast is None:
            return None
        lead = (1,) * (next(iter(g.values())).ndim - 1)
        sources = fresh_pgd_sources(self.d.Cs, lead, generator=self.generator)
        for s in sources.values():
            self.broadcast(s.data)
        return sources

    def _autocast(self):
        """bf16 autocast on CUDA when configured; the KL itself is computed in fp32 (losses.py)."""
        enabled = self.d.config.optim.bf16 and self.d.model_device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)

    def _forward_loss(self, batch: Tensor, y_star: Tensor, masks, delta_masks, routing) -> Tensor:
        with self._autocast():
            out = output_of(self.d.model(batch, masks=masks, delta_masks=delta_masks, routing=routing))
        return reconstruction(self.d.config.loss.output_loss, y_star, out)

    def _backward(self, total: Tensor, l_adv: Tensor) -> list[Tensor | None] | None:
        """Backward of the total loss; returns ∂L_adv/∂s for the PPGD ascent (None without PPGD)."""
        total.backward()
        coefficient = self.d.config.loss.adversarial
        if self.ppgd is None or coefficient == 0:
            return None
        # The sources are leaves of the same graph and only L_adv reads them, so the one backward above left
        # coefficient · ∂L_adv/∂s in their .grad: no second pass through the adversarial graph.
        return [None if s.grad is None else s.grad / coefficient for s in self.ppgd.source_list()]

    def step(self, batch: Tensor, step: int) -> StepLog:
        """One optimiser step of every loss, in the order docs/method.md lists them.

        Long on purpose: the four masked forwards, the adversary's sources and the loss sum share one graph
        and one backward, and reading them in one place is how the step is checked against the method.
        """
        cfg, d, gen = self.d.config, self.d, self.generator
        if revival_due(cfg.revive, step, cfg.optim.steps):
            revive_dead(d, batch, cfg.revive, self.opt)
        lr = cosine_lr(step, cfg.optim.steps, cfg.optim.lr, cfg.optim.lr_final_frac, cfg.optim.lr_warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        p = p_schedule(
            step,
            cfg.optim.steps,
            cfg.loss.p_start,
            cfg.loss.p_end,
            cfg.loss.p_anneal_start_frac,
            cfg.loss.p_anneal_end_frac,
        )
        with self._autocast():
            out, xs = d.model.forward_with_inputs(batch)
            y_star = output_of(out).detach()
            g, g_up = d.causal_importance(xs)
        leading = tuple(next(iter(g.values())).shape[:-1])

        l_faith = faithfulness_loss([d.model.components(path).delta() for path in d.module_paths])

        l_stoch = y_star.new_zeros((), dtype=torch.float32)
        for _ in range(cfg.loss.mask_samples):
            routing = routing_masks(d, cfg.loss.routing, leading, gen)
            masks, delta_masks = stochastic_masks(g, leading, gen, binomial=cfg.loss.sources == "binomial")
            l_stoch = l_stoch + self._forward_loss(batch, y_star, masks, delta_masks, routing)
        l_stoch = l_stoch / cfg.loss.mask_samples

        l_adv = y_star.new_zeros((), dtype=torch.float32)
        if cfg.adversary.kind != "none":
            adv_routing = routing_masks(d, cfg.adversary.routing, leading, gen)

            def adv_loss(masks, delta_masks):
                return self._forward_loss(batch, y_star, masks, delta_masks, adv_routing)

            if self.ppgd is not None:
                self.ppgd.ensure_sources(leading, device=y_star.device)
                self.ppgd.warmup(adv_loss, g, step)
                l_adv = adv_loss(*self.ppgd.masks(g))
            else:
                masks, delta_masks, _ = fresh_pgd(
                    adv_loss,
                    g,
                    d.Cs,
                    n_steps=cfg.adversary.fresh_steps,
                    step_size=cfg.adversary.fresh_step_size,
                    generator=gen,
                    reduce_grad=self.reduce_source_grad,
                    sources=self._shared_sources(g),
                )
                l_adv = adv_loss(masks, delta_masks)

        n_ref = cfg.loss.n_ref or self.n_ref
        imp, freq = minimality_loss(list(g_up.values()), p, cfg.loss.eps, cfg.loss.frequency_beta, n_ref)
        total = (
            cfg.loss.faithfulness * l_faith
            + cfg.loss.stochastic * l_stoch
            + cfg.loss.adversarial * l_adv
            + cfg.loss.importance * (imp + freq)
        )
        source_grads = self._backward(total, l_adv)
        if self.reduce_grads is not None:
            self.reduce_grads(self.uv + self.ci_params)
        if cfg.optim.clip_uv is not None:
            torch.nn.utils.clip_grad_norm_(self.uv, cfg.optim.clip_uv)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if source_grads is not None:
            self.ppgd.ascend(source_grads, step)

        with torch.no_grad():
            l0 = sum(float((g_l > 0).sum(-1).float().mean()) for g_l in g.values())
        return StepLog(
            step=step,
            total=total.item(),
            faithfulness=l_faith.item(),
            stochastic=l_stoch.item(),
            adversarial=l_adv.item(),
            importance=imp.item(),
            frequency=freq.item(),
            p=p,
            lr=lr,
            l0=l0,
        )


def faithfulness_warmup(d: Decomposition, *, steps: int, lr: float, progress: bool = False) -> float:
    """Minimise only L_Δ over U and V with a separate AdamW (docs/method.md §4); the CI function is untouched."""
    from tqdm.auto import tqdm

    uv, _ = d.trainable_parameters()
    opt = torch.optim.AdamW(uv, lr=lr, weight_decay=0.0)
    loss = torch.zeros(())
    for _ in tqdm(range(steps), desc="faithfulness warm-up", disable=not progress):
        loss = faithfulness_loss([d.model.components(p).delta() for p in d.module_paths])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()

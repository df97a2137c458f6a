"""Evaluation of a decomposition (docs/method.md §10): CE and KL under masking modes, the fresh shared-source
PGD probe, L0 and alive subcomponents.

Deterministic modes use the same masks on every batch; stochastic ones draw from a generator seeded
by `seed`, so an evaluation is repeatable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from decomposer.vpd.adversary import fresh_pgd
from decomposer.vpd.losses import mask_from_sources
from decomposer.vpd.run import Decomposition
from decomposer.vpd.step import output_of, reconstruction, routing_masks, stochastic_masks

MODES = ("unmasked", "stochastic", "ci", "rounded_0", "rounded_0.1", "rounded_0.5", "zero", "random")
ALIVE_THRESHOLD = 1e-6


def mode_masks(mode: str, g: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """The masks of one evaluation mode (docs/method.md §10 table)."""
    if mode == "unmasked":
        return {p: torch.ones_like(g_l) for p, g_l in g.items()}
    if mode == "ci":
        return dict(g)
    if mode == "zero":
        return {p: torch.zeros_like(g_l) for p, g_l in g.items()}
    if mode.startswith("rounded_"):
        tau = float(mode.split("_", 1)[1])
        return {p: (g_l > tau).to(g_l.dtype) for p, g_l in g.items()}
    r = {p: torch.rand(g_l.shape, generator=generator, device=generator.device).to(g_l) for p, g_l in g.items()}
    if mode == "random":
        return r
    assert mode == "stochastic", mode
    return {p: mask_from_sources(g_l, r[p]) for p, g_l in g.items()}


def _ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token CE summed over positions 1..T−1 (the first token has no prediction)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")


def _is_lm(batch: Tensor) -> bool:
    return not batch.is_floating_point()


@torch.no_grad()
def evaluate(
    d: Decomposition,
    batches: Sequence[Tensor],
    *,
    modes: Sequence[str] = MODES,
    pgd_steps: Sequence[int] = (20, 40, 80),
    pgd_step_size: float = 0.1,
    seed: int = 0,
) -> dict:
    """CE/KL per masking mode (Δ excluded and included), stochastic-subset KL, PGD probe, L0, alive.

    Returns a JSON-ready dict; CE entries exist only for language-model batches (integer tokens).
    """
    gen = torch.Generator().manual_seed(seed)
    kind = d.config.loss.output_loss
    sums: dict[str, float] = {}
    n_pos = n_pred = 0
    ci_sum = {p: 0.0 for p in d.module_paths}
    l0_sum = {p: 0.0 for p in d.module_paths}
    cache = []
    device = d.model_device
    for batch in batches:
        batch = batch.to(device)
        out, xs = d.model.forward_with_inputs(batch)
        y_star = output_of(out)
        g, _ = d.causal_importance(xs)
        leading = tuple(next(iter(g.values())).shape[:-1])
        positions = math.prod(leading)
        n_pos += positions
        lm = _is_lm(batch)
        if lm:
            n_pred += batch[:, 1:].numel()
            sums["target.ce"] = sums.get("target.ce", 0.0) + float(_ce(y_star, batch))
        for p, g_l in g.items():
            ci_sum[p] = ci_sum[p] + g_l.reshape(-1, g_l.shape[-1]).sum(0)
            l0_sum[p] += float((g_l > 0).sum())
        for mode in modes:
            masks = mode_masks(mode, g, gen)
            for with_delta in (False, True):
                delta = None
                if with_delta:
                    deterministic = mode not in ("stochastic", "random")
                    delta = {
                        p: (torch.ones(leading) if deterministic else torch.rand(leading, generator=gen)).to(device)
                        for p in d.module_paths
                    }
                logits = output_of(d.model(batch, masks=masks, delta_masks=delta))
                key = f"{mode}.{'with_delta' if with_delta else 'no_delta'}"
                sums[key + ".kl"] = sums.get(key + ".kl", 0.0) + float(reconstruction(kind, y_star, logits)) * positions
                if lm:
                    sums[key + ".ce"] = sums.get(key + ".ce", 0.0) + float(_ce(logits, batch))
        routing = routing_masks(d, "uniform_k", leading, gen)
        masks, delta = stochastic_masks(g, leading, gen)
        logits = output_of(d.model(batch, masks=masks, delta_masks=delta, routing=routing))
        sums["stochastic_subset.kl"] = (
            sums.get("stochastic_subset.kl", 0.0) + float(reconstruction(kind, y_star, logits)) * positions
        )
        cache.append((batch, y_star, g))

    report: dict = {"tokens": n_pos, "modes": {}}
    target_ce = sums["target.ce"] / n_pred if n_pred else None
    zero_ce = sums.get("zero.no_delta.ce", 0.0) / n_pred if n_pred else None
    report["target_ce"] = target_ce
    for mode in modes:
        report["modes"][mode] = {}
        for variant in ("no_delta", "with_delta"):
            entry = {"kl": sums[f"{mode}.{variant}.kl"] / n_pos}
            if n_pred:
                ce = sums[f"{mode}.{variant}.ce"] / n_pred
                entry.update(ce=ce, ce_difference=ce - target_ce)
                if zero_ce is not None and zero_ce != target_ce:
                    entry["ce_unrecovered"] = (ce - target_ce) / (zero_ce - target_ce)
            report["modes"][mode][variant] = entry
    report["stochastic_subset_kl"] = sums["stochastic_subset.kl"] / n_pos
    report["pgd"] = pgd_probe(d, cache, n_steps=pgd_steps, step_size=pgd_step_size, generator=gen)
    report["pgd_step_size"] = pgd_step_size
    mean_ci = {p: (ci_sum[p] / n_pos) for p in d.module_paths}
    report["l0"] = {p: l0_sum[p] / n_pos for p in d.module_paths}
    report["l0_total"] = sum(report["l0"].values())
    report["alive"] = {p: int((mean_ci[p] > ALIVE_THRESHOLD).sum()) for p in d.module_paths}
    report["alive_total"] = sum(report["alive"].values())
    report["C"] = d.Cs
    report["C_total"] = sum(d.Cs.values())
    report["mean_ci"] = {p: v.tolist() for p, v in mean_ci.items()}
    return report


def pgd_probe(
    d: Decomposition, cache, *, n_steps: Sequence[int], step_size: float, generator: torch.Generator
) -> dict[str, float]:
    """Mean KL of fresh sign-PGD after each of `n_steps` steps, sources shared over batches and positions; Δ included.

    `cache` holds (batch, y*, g) per batch. The g of all batches are flattened into one (N, C) tensor per
    matrix so that one set of shared sources is optimised against the mean over the whole evaluation set.
    One run of max(n_steps) steps is read at every requested count: the 20-step value is the 80-step run's
    20th iterate, so the counts share one initial draw and cost max(n_steps) steps, not their sum.
    """
    if not n_steps:
        return {}
    kind = d.config.loss.output_loss
    g_all = {p: torch.cat([g[p].reshape(-1, g[p].shape[-1]) for _, _, g in cache]) for p in d.module_paths}
    sizes = [math.prod(g[d.module_paths[0]].shape[:-1]) for _, _, g in cache]

    def loss_fn(masks, delta_masks):
        chunks = {p: masks[p].split(sizes) for p in d.module_paths}
        delta_chunks = {p: delta_masks[p].split(sizes) for p in d.module_paths}
        total = 0.0
        for i, (batch, y_star, g) in enumerate(cache):
            local = {p: chunks[p][i].reshape(g[p].shape) for p in d.module_paths}
            delta = {p: delta_chunks[p][i].reshape(g[p].shape[:-1]) for p in d.module_paths}
            total = total + reconstruction(kind, y_star, output_of(d.model(batch, masks=local, delta_masks=delta)))
        return total / len(cache)

    losses: list[float] = []
    fresh_pgd(loss_fn, g_all, d.Cs, n_steps=max(n_steps), step_size=step_size, generator=generator, losses=losses)
    return {str(n): losses[n] for n in sorted(set(n_steps))}


@torch.no_grad()
def quick_eval(d: Decomposition, batches: Sequence[Tensor]) -> dict:
    """The cheap subset logged during training: unmasked, stochastic and CI-as-mask, L0; no PGD."""
    report = evaluate(d, batches[:1], modes=("unmasked", "stochastic", "ci"), pgd_steps=())
    out = {"l0_total": report["l0_total"], "alive_total": report["alive_total"]}
    for mode, variants in report["modes"].items():
        out[mode] = variants["no_delta"]
    out["target_ce"] = report["target_ce"]
    return out

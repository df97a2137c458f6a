"""How well a circuit alone carries a prediction: P(y*) and KL under the three mask modes
(docs/attribution-graphs.md §5).

A circuit is a set of sites (subcomponent, optional position). With g the prompt's CI and g_c = g inside the
circuit and 0 outside, the circuit is scored exactly as `attrgraph.optimize.faithfulness` scores a graph
whose CI is g_c, and the whole graph (g itself) under the same random draws is the reference:

| mode        | masks on g_c (and on g for the reference)                                                  |
|-------------|--------------------------------------------------------------------------------------------|
| CI          | m = g_c, Δ off                                                                             |
| stochastic  | m = g_c + (1 − g_c)·r, r ~ U(0, 1), Δ ~ U(0, 1); the mean over the draws                   |
| adversarial | sign PGD on CE(y*) over the sources of every alive entry (CI network's g > 0 on the prompt, |
|             | or g > 0): outside the circuit the adversary sets any mask in [0, 1], inside it any in    |
|             | [g, 1]; Δ and dead entries keep one uniform draw per restart; P is the lowest seen         |

So a circuit made of every alive entry reports the graph's own three numbers, and faithfulness = P / P_graph
is 1 there; a smaller circuit is only as good as what survives an adversary on everything it left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from attrgraph.nodes import NodeId
from circuits.interventions import check_ids, logits_of, resolve_sites
from circuits.readout import log_probs_fp32, readout
from decomposer.errors import VpdError
from decomposer.vpd.losses import mask_from_sources
from decomposer.vpd.run import Decomposition


class PerMode(NamedTuple):
    """One (B,) tensor per mask mode of docs/attribution-graphs.md §5."""

    ci: Tensor
    stochastic: Tensor
    adversarial: Tensor


@dataclass(frozen=True)
class CircuitFaithfulness:
    """How well a circuit alone carries P(y*) at t*, per mask mode, per prompt row.

    Attributes:
        target: (B,) P(y*) under the target.
        p: P(y*) under the circuit's masks (module docstring).
        kl: KL(target ‖ masked) at t*: under the CI masks; the mean over the stochastic draws; at the
            adversary's final sources of its strongest restart.
        graph: P(y*) of the whole graph (g_c = g) under the same draws, its adversary acting on the same entries.
        faithfulness: p / graph per mode; 1 when the circuit is the whole graph.
        n_circuit: (B,) circuit entries (l, t, c) with t ≤ t* that are alive (CI > 0).
        n_alive: (B,) alive entries with t ≤ t*.
        n_samples: Stochastic draws.
        pgd_steps: Sign steps per restart.
        restarts: PGD restarts.
    """

    target: Tensor
    p: PerMode
    kl: PerMode
    graph: PerMode
    faithfulness: PerMode
    n_circuit: Tensor
    n_alive: Tensor
    n_samples: int
    pgd_steps: int
    restarts: int

    def as_dict(self) -> dict:
        """Plain lists and numbers, for JSON."""
        out: dict = {"target": self.target.tolist()}
        for name in ("p", "kl", "graph", "faithfulness"):
            out[name] = {mode: t.tolist() for mode, t in getattr(self, name)._asdict().items()}
        out.update(
            n_circuit=self.n_circuit.tolist(),
            n_alive=self.n_alive.tolist(),
            n_samples=self.n_samples,
            pgd_steps=self.pgd_steps,
            restarts=self.restarts,
        )
        return out


def _row_ci(
    d: Decomposition, tokens: Tensor, ci: dict[str, Tensor] | None, b: int, B: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Path → (L, C) CI of row b on its first L = t* + 1 tokens, and the alive entries the adversary moves.

    The CI is given, or the CI network's; alive is the network's g > 0 together with the given CI's g > 0, so
    without a given CI the one network forward serves both.
    """
    from attrgraph.optimize import base_alive

    L = tokens.shape[1]
    if ci is None:
        g = {p: v[0] for p, v in d.network_ci(tokens).items()}
        return g, {p: v > 0 for p, v in g.items()}
    out = {}
    for p, C in d.Cs.items():
        g = ci.get(p)
        if g is not None and g.ndim == 3 and g.shape[0] == B:
            g = g[b]
        elif g is not None and not (g.ndim == 2 and B == 1):
            g = None
        if g is None or g.shape[0] < L or g.shape[1] != C:
            raise VpdError(
                f"`ci` must map every decomposed path to a (B, T, C) tensor, or (T, C) for one prompt, "
                f"covering t*; {p!r} (C={C}) has {None if p not in ci else tuple(ci[p].shape)}."
            )
        out[p] = g[:L].detach().to(device=d.model_device, dtype=d.model.components(p).V.dtype)
    base = base_alive(d, tokens)
    return out, {p: base[p] | (v > 0) for p, v in out.items()}


def _row(
    d: Decomposition,
    tokens: Tensor,
    g: dict[str, Tensor],
    alive: dict[str, Tensor],
    inside: dict[str, Tensor],
    ref: Tensor,
    y: int,
    gen: torch.Generator,
    n_samples: int,
    pgd_steps: int,
    pgd_step_size: float,
    restarts: int,
) -> dict[str, float]:
    """The numbers of `circuit_faithfulness` for one (1, t* + 1) prompt; `ref` is the target's log-probs at t*.

    `alive` holds the entries the adversary moves (see `_row_ci`).

    Draws are taken in the order `attrgraph.optimize.faithfulness` takes them (stochastic chunks, then one
    draw per restart), so equal seeds give equal numbers for the whole graph.
    """
    from attrgraph.optimize import STOCH_CHUNK, Sources, pgd_sources, uniform_sources

    t_star = tokens.shape[1] - 1
    g_c = {p: g[p] * inside[p] for p in g}

    def log_probs(masks: dict[str, Tensor], deltas: dict[str, Tensor] | None) -> Tensor:
        n = next(iter(masks.values())).shape[0]
        with torch.no_grad():
            return log_probs_fp32(logits_of(d.model(tokens.expand(n, -1), masks=masks, delta_masks=deltas))[:, t_star])

    def mixed(gg: dict[str, Tensor], s: dict[str, Tensor]) -> dict[str, Tensor]:
        return {p: mask_from_sources(gg[p], s[p]).reshape(-1, *gg[p].shape) for p in gg}

    def kl(lq: Tensor) -> Tensor:
        return (ref.exp() * (ref - lq)).sum(-1)

    out = {"target": float(ref[y].exp())}
    lq = log_probs({p: v[None] for p, v in g_c.items()}, None)[0]
    out.update(p_ci=float(lq[y].exp()), kl_ci=float(kl(lq)))
    out["graph_ci"] = float(log_probs({p: v[None] for p, v in g.items()}, None)[0, y].exp())
    p_s, kl_s, p_graph = [], [], []
    for start in range(0, n_samples, STOCH_CHUNK):
        draw = uniform_sources(g, gen, min(STOCH_CHUNK, n_samples - start))
        lq = log_probs(mixed(g_c, draw.r), draw.delta)
        p_s.append(lq[:, y].exp())
        kl_s.append(kl(lq))
        p_graph.append(log_probs(mixed(g, draw.r), draw.delta)[:, y].exp())
    out.update(p_stochastic=float(torch.cat(p_s).mean()), kl_stochastic=float(torch.cat(kl_s).mean()))
    out["graph_stochastic"] = float(torch.cat(p_graph).mean())

    def attack(gg: dict[str, Tensor], start: Sources) -> tuple[Sources, float]:
        return pgd_sources(
            d, tokens, gg, alive, start, target_pos=t_star, target_token=y, n_steps=pgd_steps, step_size=pgd_step_size
        )

    worst, graph_worst, out["kl_adversarial"] = -math.inf, -math.inf, math.nan
    for _ in range(restarts):
        draw = uniform_sources(g, gen)
        s, ce = attack(g_c, draw)
        if ce > worst:
            worst, out["kl_adversarial"] = ce, float(kl(log_probs(mixed(g_c, s.r), s.delta)[0]))
        graph_worst = max(graph_worst, attack(g, draw)[1])
    out.update(p_adversarial=math.exp(-worst), graph_adversarial=math.exp(-graph_worst))
    out["n_circuit"] = sum(int((inside[p] & (g[p] > 0)).sum()) for p in g)
    out["n_alive"] = sum(int((g[p] > 0).sum()) for p in g)
    return out


def circuit_faithfulness(
    d: Decomposition,
    ids: Tensor,
    circuit_nodes: Iterable[str | NodeId],
    target_pos: int | Sequence[int],
    target_token: int | Sequence[int] | None = None,
    *,
    ci: dict[str, Tensor] | None = None,
    n_samples: int = 64,
    pgd_steps: int = 4,
    pgd_step_size: float = 1.0,
    restarts: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> CircuitFaithfulness:
    """P(y*) and KL when only a circuit is kept, under CI, stochastic and adversarial masks (module docstring).

    Args:
        d: The decomposition.
        ids: (B, T) token ids; each row is cut after its t*.
        circuit_nodes: Sites (a site without a position covers every position); emb, logit and delta nodes of a
            graph are skipped, so a graph's node list can be passed as is.
        target_pos: t*, one or one per row.
        target_token: y*, one or one per row; by default the target's top token at t*.
        ci: Path → (B, T, C) (or (T, C) for one prompt) CI, e.g. `PromptCI.g`; by default the CI network's.
        n_samples: Stochastic draws, ≥ 1.
        pgd_steps: Sign-ascent steps per restart, ≥ 0.
        pgd_step_size: Size of each sign step.
        restarts: PGD restarts, ≥ 1.
        seed: Seeds every random draw.
        progress: Show a tqdm bar over the prompt rows.

    Raises:
        VpdError: Bad ids, sites, read-out, CI or counts.
    """
    if n_samples < 1 or restarts < 1 or pgd_steps < 0:
        raise VpdError(
            f"Need `n_samples` ≥ 1, `restarts` ≥ 1, `pgd_steps` ≥ 0; got {n_samples}, {restarts}, {pgd_steps}."
        )
    ids = check_ids(d, ids)
    B, T = ids.shape
    sites = resolve_sites(d, circuit_nodes, seq_len=T, name="circuit_nodes")
    with torch.no_grad():
        target_logits = logits_of(d.model.target(ids))
    pos, tok = readout(target_logits, target_pos, target_token)
    gen = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    rows = []
    for b in tqdm(range(B), desc="circuit-faithfulness", disable=not progress):
        t_star, y = int(pos[b]), int(tok[b])
        tokens = ids[b : b + 1, : t_star + 1]
        g, alive = _row_ci(d, tokens, ci, b, B)
        inside = {p: torch.zeros_like(v, dtype=torch.bool) for p, v in g.items()}
        for s in sites:
            if s.pos is None or s.pos <= t_star:
                inside[s.path][slice(None) if s.pos is None else s.pos, s.index] = True
        ref = log_probs_fp32(target_logits[b, t_star])
        rows.append(_row(d, tokens, g, alive, inside, ref, y, gen, n_samples, pgd_steps, pgd_step_size, restarts))

    def col(key: str) -> Tensor:
        return torch.tensor([r[key] for r in rows], dtype=torch.float64)

    modes = ("ci", "stochastic", "adversarial")
    p = PerMode(*(col(f"p_{m}") for m in modes))
    graph = PerMode(*(col(f"graph_{m}") for m in modes))
    return CircuitFaithfulness(
        target=col("target"),
        p=p,
        kl=PerMode(*(col(f"kl_{m}") for m in modes)),
        graph=graph,
        faithfulness=PerMode(*(a / b for a, b in zip(p, graph, strict=True))),
        n_circuit=col("n_circuit").long(),
        n_alive=col("n_alive").long(),
        n_samples=n_samples,
        pgd_steps=pgd_steps,
        restarts=restarts,
    )

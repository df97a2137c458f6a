"""Per-prompt CI optimisation and the three-number faithfulness report (docs/attribution-graphs.md §4, §5).

`optimize_ci` re-optimises the causal importances of one prompt so that few subcomponents keep the
label y* at t*. Only the entries alive on the prompt (base CI g > 0) get a parameter φ, initialised
from the CI network's pre-activation z; every other entry is fixed at CI 0. Masks use
g̃ = σ_lower(φ), minimality uses g̃_up = σ_upper(φ) (docs/method.md §5.3).

`faithfulness` reports P(y*) under the unmodified model and under three mask modes on a given g̃:
CI (m = g̃, Δ off), stochastic (mean over draws of m ~ U(g̃, 1), Δ ~ U(0, 1)) and adversarial (PGD
over the alive entries only, the rest and Δ drawn once and held fixed; the minimum over restarts).

Choices [ours]: the lr follows `cosine_lr` with a linear warm-up over ceil(warmup_frac · steps)
steps and ends at `FINAL_LR_FRAC` · lr. The adversarial report takes the lowest P(y*) seen at any
point of any restart (the initial draw and every PGD iterate), so it is a valid lower bound found by
the attack rather than only its last iterate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attrgraph.candidates import check_tokens
from attrgraph.settings import OptimizeSettings
from decomposer.errors import VpdError
from decomposer.vpd.adversary import sign_ascent
from decomposer.vpd.losses import cosine_lr, importance_minimality, mask_from_sources
from decomposer.vpd.run import Decomposition
from decomposer.vpd.sigmoids import sigmoid_lower, sigmoid_upper

FINAL_LR_FRAC = 0.1
STOCH_CHUNK = 16  # stochastic draws per batched forward in `faithfulness`


@dataclass(frozen=True)
class PromptCI:
    """The result of `optimize_ci`.

    Attributes:
        g: Path → optimised CI g̃ (T, C), exactly 0 off the alive set.
        alive: Path → bool (T, C), the base alive set g_base > 0.
        losses: The total loss every `log_every` steps (and at the last step).
        settings: The arguments and derived values (warm-up steps, final lr fraction, alive count).
    """

    g: dict[str, Tensor]
    alive: dict[str, Tensor]
    losses: list[float] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FaithfulnessReport:
    """P(y*) at t* under the unmodified model and under the three mask modes of §5."""

    target: float
    ci: float
    stochastic: float
    adversarial: float
    pgd_steps: int
    restarts: int
    n_nodes: int


def _logits(out: object) -> Tensor:
    return out.logits if hasattr(out, "logits") else out  # HF output object or a plain tensor


def _check_prompt(d: Decomposition, tokens: Tensor, target_pos: int, target_token: int) -> Tensor:
    """The prompt checked (`candidates.check_tokens`, which cuts it after t*) and y* checked against the vocabulary.

    Stricter than the edge pass on one point: the fit takes a (1, T) LongTensor only, never (T,).
    """
    if tokens.ndim != 2 or tokens.dtype != torch.long:
        raise VpdError(f"`tokens` must be a (1, T) LongTensor; got {tuple(tokens.shape)} {tokens.dtype}.")
    tokens, target_pos = check_tokens(d, tokens, target_pos)
    head = d.model.target.get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        vocab = head.weight.shape[0]  # no forward just to learn the vocabulary size
    else:
        with torch.no_grad():
            vocab = _logits(d.model.target(tokens)).shape[-1]
    if not 0 <= target_token < vocab:
        raise VpdError(f"`target_token` must be in [0, {vocab}), the model's vocabulary; got {target_token}.")
    return tokens


def _ce(
    d: Decomposition, tokens: Tensor, masks: dict[str, Tensor], deltas: dict[str, Tensor] | None, pos: int, tok: int
) -> Tensor:
    """−log p(tok at pos) per batch row under (B, T, C) masks and optional (B, T) delta masks."""
    B = next(iter(masks.values())).shape[0]
    logits = _logits(d.model(tokens.expand(B, -1), masks=masks, delta_masks=deltas))
    # At least fp32: bf16 log-probabilities are too coarse for small P(y*).
    return -logits[:, pos].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)[:, tok]


def _masks(g: dict[str, Tensor], s: dict[str, Tensor]) -> dict[str, Tensor]:
    """`mask_from_sources` with a leading batch dim; g (T, C) broadcasts against s (T, C) or (B, T, C)."""
    return {p: mask_from_sources(g[p], s[p]).reshape(-1, *g[p].shape) for p in g}


@dataclass(frozen=True)
class Sources:
    """The sources of the stochastic and adversarial masks of one prompt (docs/method.md §6).

    Attributes:
        r: Path → (n, T, C) in [0, 1]: m = g + (1 − g)·r.
        delta: Path → (n, T) delta masks.
    """

    r: dict[str, Tensor]
    delta: dict[str, Tensor]


def uniform_sources(like: dict[str, Tensor], gen: torch.Generator, n: int = 1) -> Sources:
    """U(0, 1) sources (n, T, C) and delta masks (n, T), drawn on the CPU generator so any device agrees."""
    r, delta = {}, {}
    for p, t in like.items():
        r[p] = torch.rand(n, *t.shape, generator=gen, dtype=t.dtype).to(t.device)
        delta[p] = torch.rand(n, t.shape[0], generator=gen, dtype=t.dtype).to(t.device)
    return Sources(r, delta)


def pgd_sources(
    d: Decomposition,
    tokens: Tensor,
    g: dict[str, Tensor],
    alive: dict[str, Tensor],
    start: Sources,
    *,
    target_pos: int,
    target_token: int,
    n_steps: int,
    step_size: float,
    final_ce: bool = True,
) -> tuple[Sources, float]:
    """Sign-ascent PGD on CE(y*) over the sources of alive entries only, with g detached.

    Args:
        d: The decomposition.
        tokens: (1, T) prompt, already truncated.
        g: Path → CI (T, C); detached here.
        alive: Path → bool (T, C); only these sources move.
        start: A (1, T, C) U(0, 1) draw: `start.r` is the initial sources and the fixed sources off `alive`;
            `start.delta` is held fixed.
        target_pos: t*.
        target_token: y*.
        n_steps: Sign steps.
        step_size: Size of each sign step; sources are clamped to [0, 1].
        final_ce: Also evaluate the CE at the final sources (one more forward) for the largest CE seen; a
            caller that evaluates them itself, as the per-prompt fit does, passes False.

    Returns:
        The final sources (detached; equal to `start.r` off `alive`, with `start.delta`) and the largest CE
        seen at any iterate (with `final_ce=False`, at the iterates before the last step).
    """
    g = {p: t.detach() for p, t in g.items()}
    s, delta = {p: t.detach().clone().requires_grad_(True) for p, t in start.r.items()}, start.delta
    seen: list[float] = []
    sign_ascent(
        lambda: _ce(d, tokens, _masks(g, s), delta, target_pos, target_token).sum(),
        list(s.values()),
        n_steps=n_steps,
        step_size=step_size,
        movable=[alive[p] for p in s],
        losses=seen,
    )
    s = {p: t.detach() for p, t in s.items()}
    if final_ce:
        with torch.no_grad():
            seen.append(float(_ce(d, tokens, _masks(g, s), delta, target_pos, target_token).sum()))
    return Sources(s, delta), max(seen, default=float("nan"))


def _frozen_components(fn: Callable) -> Callable:
    """Run `fn(d, ...)` with U and V frozen: only CI moves here, and frozen components let Δ be cached."""

    @functools.wraps(fn)
    def wrapper(d: Decomposition, *args, **kwargs):
        with d.model.frozen():
            return fn(d, *args, **kwargs)

    return wrapper


def _base_z(d: Decomposition, tokens: Tensor) -> dict[str, Tensor]:
    """The CI network's pre-activations z (T, C) on the prompt."""
    with torch.no_grad():
        _, xs = d.model.forward_with_inputs(tokens)
        acts = {p: d.model.components(p).component_acts(x) for p, x in xs.items()}
        return {p: z[0] for p, z in d.ci_fn(xs, acts).items()}


def base_alive(d: Decomposition, tokens: Tensor) -> dict[str, Tensor]:
    """Path → bool (T, C): the entries alive on the prompt under the CI network (g > 0), where the adversary acts."""
    return {p: sigmoid_lower(z, d.config.ci.alpha) > 0 for p, z in _base_z(d, tokens).items()}


def _ce_terms(
    d: Decomposition,
    tokens: Tensor,
    g: dict[str, Tensor],
    alive: dict[str, Tensor],
    gen: torch.Generator,
    settings: OptimizeSettings,
    target_pos: int,
    target_token: int,
) -> list[Tensor]:
    """The CE terms of one step's loss for `settings.mode` (see `optimize_ci`), to be added in this order."""
    if settings.mode == "ci":
        return [_ce(d, tokens, {k: v[None] for k, v in g.items()}, None, target_pos, target_token)[0]]
    draw = uniform_sources(g, gen)
    if settings.mode == "stochastic":
        return [_ce(d, tokens, _masks(g, draw.r), draw.delta, target_pos, target_token)[0]]
    # Alive sources start from this step's uniform draw; the rest keep it, held fixed.
    attacked, _ = pgd_sources(
        d,
        tokens,
        g,
        alive,
        draw,
        target_pos=target_pos,
        target_token=target_token,
        n_steps=settings.pgd_steps,
        step_size=settings.pgd_step_size,
        final_ce=False,  # the CE at the attacked sources is computed below, with gradient to g
    )
    # The stochastic and the attacked masks in one batch of two: one forward instead of two.
    sources = {p: torch.cat([draw.r[p], attacked.r[p]]) for p in g}
    deltas = {p: torch.cat([draw.delta[p], attacked.delta[p]]) for p in g}
    ce_stoch, ce_adv = _ce(d, tokens, _masks(g, sources), deltas, target_pos, target_token)
    return [0.5 * ce_stoch, 0.5 * ce_adv]


@_frozen_components
def optimize_ci(
    d: Decomposition,
    tokens: Tensor,
    *,
    target_pos: int,
    target_token: int,
    settings: OptimizeSettings | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> PromptCI:
    """Re-optimise the CI of one prompt for the prediction of `target_token` at `target_pos` (§4).

    Losses, with CE_x = −log p_masked(y* at t*) and L_imp = Σ_l Σ_c mean_t (g̃_up + ε)^p:

    - `adversarial` (type 1): 0.5·CE_stoch + 0.5·CE_adv + l_min·L_imp.
    - `ci` (type 2): CE with m = g̃ and Δ excluded + l_min·L_imp (the paper uses l_min = 1.0).
    - `stochastic`: CE_stoch + l_min·L_imp.

    The lr follows a linear warm-up over ceil(warmup_frac · steps) steps, then a cosine decay to
    `FINAL_LR_FRAC`·lr.

    Args:
        d: The decomposition; left unchanged.
        tokens: (1, T) LongTensor; tokens after `target_pos` are dropped.
        target_pos: t*, in [0, T).
        target_token: y*, in the vocabulary.
        settings: Mode, steps, lr, λ_min and the adversary's steps (`attrgraph.settings.OptimizeSettings`);
            None: the defaults. Build them from user input with `optimize_settings(**values)`.
        progress: Show a tqdm bar (True), or call `progress(steps_done, steps)` after each step.

    Returns:
        The optimised CI, the base alive set, the logged losses and the settings.

    Raises:
        VpdError: A bad `target_pos` or `target_token`, or bad `tokens`.
    """
    settings = OptimizeSettings() if settings is None else settings
    mode, steps, lr, l_min = settings.mode, settings.steps, settings.lr, settings.lambda_min
    p, eps, warmup_frac = settings.p, settings.eps, settings.warmup_frac
    seed, log_every = settings.seed, settings.log_every
    tokens = _check_prompt(d, tokens, target_pos, target_token)
    alpha = d.config.ci.alpha
    z = _base_z(d, tokens)
    alive = {path: sigmoid_lower(zp, alpha) > 0 for path, zp in z.items()}
    # One parameter per alive entry; the rest never exist, so they stay at CI 0 exactly.
    phi = {path: z[path][alive[path]].clone().requires_grad_(True) for path in z}
    params = list(phi.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup_steps = min(math.ceil(warmup_frac * steps), steps - 1)
    gen = torch.Generator().manual_seed(seed)

    def full(fn: Callable[[Tensor, float], Tensor]) -> dict[str, Tensor]:
        out = {}
        for path, a in alive.items():
            dense = torch.zeros(a.shape, dtype=phi[path].dtype, device=a.device)
            out[path] = dense.masked_scatter(a, fn(phi[path], alpha))
        return out

    from tqdm.auto import tqdm

    losses: list[float] = []
    report = progress if callable(progress) else None  # e.g. a server's progress for its page
    for step in tqdm(range(steps), desc="optimize-ci", disable=progress is not True):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, FINAL_LR_FRAC, warmup_steps)
        g, g_up = full(sigmoid_lower), full(sigmoid_upper)
        loss = l_min * importance_minimality(list(g_up.values()), p, eps).loss
        for term in _ce_terms(d, tokens, g, alive, gen, settings, target_pos, target_token):
            loss = loss + term
        # autograd.grad rather than backward, so no gradient lands on the decomposition's own parameters.
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
        if report is not None:
            report(step + 1, steps)
    with torch.no_grad():
        g = {path: t.detach() for path, t in full(sigmoid_lower).items()}
    kept = settings.model_dump(include={"p", "eps", "pgd_steps", "pgd_step_size", "seed", "log_every"})
    record = {
        "mode": mode,
        "steps": steps,
        "lr": lr,
        "warmup_frac": warmup_frac,
        "warmup_steps": warmup_steps,
        "final_lr_frac": FINAL_LR_FRAC,
        "l_min": l_min,
        **kept,
        "target_pos": target_pos,
        "target_token": target_token,
        "n_alive": sum(int(a.sum()) for a in alive.values()),
    }
    return PromptCI(g=g, alive=alive, losses=losses, settings=record)


@_frozen_components
def faithfulness(
    d: Decomposition,
    tokens: Tensor,
    g: dict[str, Tensor],
    *,
    target_pos: int,
    target_token: int,
    n_samples: int = 64,
    pgd_steps: int = 4,
    restarts: int = 4,
    seed: int = 0,
    alive: dict[str, Tensor] | None = None,
) -> FaithfulnessReport:
    """P(y*) at t* under the unmodified model and the CI, stochastic and adversarial masks on `g` (§5).

    The adversary moves the same entries as during the optimisation (§4): every entry alive on the prompt
    under the CI network (base g > 0), so the subcomponents a graph pruned away are partially re-inserted
    against it. Entries outside that set and Δ keep a stochastic draw per restart.

    Args:
        d: The decomposition.
        tokens: (1, T) LongTensor; tokens after `target_pos` are dropped.
        g: Path → CI (T', C) with T' ≥ target_pos + 1 (extra rows are ignored), e.g. `PromptCI.g`.
        target_pos: t*.
        target_token: y*.
        n_samples: Stochastic draws, ≥ 64.
        pgd_steps: Sign steps of size 1.0 per restart, ≥ 0.
        restarts: PGD restarts, ≥ 1.
        seed: Seeds every random draw.
        alive: Path → bool (≥ T, C): the entries the adversary moves; by default the prompt's base alive set
            together with the entries where `g` > 0.

    Returns:
        The report; `n_nodes` counts the (l, t, c) with g > 0.

    Raises:
        VpdError: Bad prompt, target, counts, or a `g` that does not fit the decomposition.
    """
    tokens = _check_prompt(d, tokens, target_pos, target_token)
    if n_samples < 64 or restarts < 1 or pgd_steps < 0:
        raise VpdError(f"Need n_samples ≥ 64, restarts ≥ 1, pgd_steps ≥ 0; got {n_samples}, {restarts}, {pgd_steps}.")
    T, Cs = tokens.shape[1], d.Cs
    if set(g) != set(Cs) or any(g[k].ndim != 2 or g[k].shape[0] < T or g[k].shape[1] != c for k, c in Cs.items()):
        raise VpdError(f"`g` must map every decomposed path to a (≥{T}, C) tensor; paths {sorted(Cs)}, C {Cs}.")
    dtype = d.model.components(d.module_paths[0]).V.dtype
    g = {k: v[:T].detach().to(device=d.model_device, dtype=dtype) for k, v in g.items()}
    if alive is None:
        base = base_alive(d, tokens)
        alive = {k: base[k] | (v > 0) for k, v in g.items()}
    elif set(alive) != set(Cs) or any(alive[k].shape[0] < T or alive[k].shape[1:] != g[k].shape[1:] for k in Cs):
        raise VpdError(f"`alive` must map every decomposed path to a (≥{T}, C) bool tensor, like `g`.")
    else:
        alive = {k: v[:T].to(device=d.model_device, dtype=torch.bool) for k, v in alive.items()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logits = _logits(d.model.target(tokens))[0, target_pos]
        clean = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)[target_token]
        p_ci = (-_ce(d, tokens, {k: v[None] for k, v in g.items()}, None, target_pos, target_token)).exp()
        p_stoch = []
        for start in range(0, n_samples, STOCH_CHUNK):
            draw = uniform_sources(g, gen, min(STOCH_CHUNK, n_samples - start))
            p_stoch.append((-_ce(d, tokens, _masks(g, draw.r), draw.delta, target_pos, target_token)).exp())
    worst = -math.inf
    for _ in range(restarts):
        _, ce = pgd_sources(
            d,
            tokens,
            g,
            alive,
            uniform_sources(g, gen),
            target_pos=target_pos,
            target_token=target_token,
            n_steps=pgd_steps,
            step_size=1.0,
        )
        worst = max(worst, ce)
    return FaithfulnessReport(
        target=float(clean),
        ci=float(p_ci[0]),
        stochastic=float(torch.cat(p_stoch).mean()),
        adversarial=math.exp(-worst),
        pgd_steps=pgd_steps,
        restarts=restarts,
        n_nodes=sum(int((v > 0).sum()) for v in g.values()),
    )

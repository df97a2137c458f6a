"""The adversaries of the adversarial reconstruction loss: persistent PGD [VPD] and fresh PGD [SPD].

Both pick *sources* s ∈ [0, 1]^(C+1) per matrix, inside the box the causal importance g allows
(docs/method.md §6, §8.3):

    m   = g + (1 − g) · s[..., :C]
    m_Δ = s[..., C]

- `PersistentPGD` [VPD]: one source per batch slot (B_local, T, C + 1), drawn once from U(0, 1) and
  never re-initialised, moved by Adam *ascent* (β = (0.5, 0.99), eps 1e-8, bias correction) and
  clamped to [0, 1]. Per training step (§9.1): `warmup` (two ascents with g detached), the loss with
  the live g, then `ascend` with that loss's source gradient after the main optimiser step.
- `fresh_pgd`: sources shared across batch and positions (1, 1, C + 1), re-drawn on every call,
  moved by sign ascent (`sign_ascent`) and clamped. It is the [SPD] training adversary (1 step of 1.0 or 4 of 0.5)
  and the evaluation probe (§10: 20/40/80 steps of 0.1).

DDP (§11): PPGD sources and their Adam state are rank-local and never reduced; each rank saves its
own. Shared fresh-PGD sources must stay identical on every rank: give every rank the same initial
sources (an equally seeded generator, or `sources` broadcast from rank 0) and an all-reduce (AVG)
as `reduce_grad`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from decomposer.errors import VpdError
from decomposer.vpd.config import AdversaryConfig
from decomposer.vpd.losses import mask_from_sources, step_progress

logger = logging.getLogger(__name__)

Masks = dict[str, Tensor]
LossFn = Callable[[Masks, Masks], Tensor]


def sources_to_masks(g: Mapping[str, Tensor], sources: Mapping[str, Tensor]) -> tuple[Masks, Masks]:
    """Masks m = g + (1 − g)·s[..., :C] and delta masks m_Δ = s[..., C] for every matrix.

    Args:
        g: Path → causal importance (..., C), e.g. (B, T, C) or (B, C) for toys.
        sources: Path → sources (..., C + 1) in [0, 1], per slot or shared (leading dims of size 1).

    Returns:
        `(masks, delta_masks)`: masks of `g`'s shape and delta masks of shape `g.shape[:-1]`.

    Raises:
        VpdError: The paths differ, a source's last dim is not C + 1, or it does not broadcast to `g`.
    """
    if set(g) != set(sources):
        raise VpdError(
            f"`g` has paths {sorted(g)} but `sources` has {sorted(sources)}. Pass one source per decomposed matrix."
        )
    masks, delta_masks = {}, {}
    for path, g_l in g.items():
        s, C = sources[path], g_l.shape[-1]
        lead = g_l.shape[:-1]
        if s.shape[-1] != C + 1 or s.ndim > g_l.ndim or torch.broadcast_shapes(lead, s.shape[:-1]) != lead:
            raise VpdError(
                f"`sources[{path!r}]` has shape {tuple(s.shape)}, which does not fit `g[{path!r}]` of shape "
                f"{tuple(g_l.shape)}. Pass sources of shape {(*lead, C + 1)} or {(1,) * len(lead) + (C + 1,)}."
            )
        masks[path] = mask_from_sources(g_l, s[..., :C])
        delta_masks[path] = s[..., C].expand(lead)
    return masks, delta_masks


def _grad_list(loss: Tensor, sources: list[Tensor]) -> list[Tensor]:
    # A matrix that cannot reach the loss (e.g. unrouted everywhere) gets a zero gradient, not an error.
    return list(torch.autograd.grad(loss, sources, materialize_grads=True))


class PersistentPGD:
    """[VPD] persistent per-slot adversarial sources, updated by Adam ascent (docs/method.md §8.3).

    A source belongs to a batch slot (b, t), not to a datapoint. The first batch fixes its shape, and a
    batch of any other shape is an error: drop the last incomplete batch instead. The sources are
    rank-local under DDP: never all-reduce them or their Adam state.

    Args:
        Cs: Path → C, in module order (`{p: model.components(p).C for p in model.module_paths}`).
        config: The adversary settings: `lr`, `warmup_frac`, `betas`, `eps`, `warmup_ascents`.
        total_steps: Training steps, for the lr warm-up.
        generator: Draws the U(0, 1) initial sources; seed it per rank. None uses torch's global generator.

    Raises:
        VpdError: `Cs` is empty or has a C below 1, or `total_steps` < 1.
    """

    def __init__(
        self,
        Cs: Mapping[str, int],
        config: AdversaryConfig,
        total_steps: int,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if not Cs or any(C < 1 for C in Cs.values()):
            raise VpdError(f"`Cs` must map each decomposed path to a C ≥ 1; got {dict(Cs)}.")
        if total_steps < 1:
            raise VpdError(f"`total_steps` must be ≥ 1; got {total_steps}. Pass the number of training steps.")
        self.Cs = dict(Cs)
        self.config = config
        self.total_steps = total_steps
        self.generator = generator
        self.sources: dict[str, Tensor] = {}  # leaf tensors that require grad, updated in place
        self._exp_avg: dict[str, Tensor] = {}
        self._exp_avg_sq: dict[str, Tensor] = {}
        self.t = 0  # Adam steps taken, for the bias correction

    @property
    def leading_shape(self) -> tuple[int, ...] | None:
        """The batch-slot shape fixed by the first batch, e.g. (B_local, T); None before it."""
        if not self.sources:
            return None
        return tuple(next(iter(self.sources.values())).shape[:-1])

    def lr_at(self, step: int) -> float:
        """Ascent lr: linear from 0 over the first `warmup_frac · total_steps` steps, then `lr`."""
        step_progress(step, self.total_steps)
        warmup_steps = self.config.warmup_frac * self.total_steps
        if step >= warmup_steps:
            return self.config.lr
        return self.config.lr * step / warmup_steps

    def ensure_sources(
        self, leading_shape: tuple[int, ...], device: torch.device | str | None, dtype: torch.dtype = torch.float32
    ) -> None:
        """Draw the sources from U(0, 1) on first use; afterwards only check that the shape still fits.

        Raises:
            VpdError: The sources already exist with a different leading shape.
        """
        leading_shape = tuple(leading_shape)
        if self.sources:
            if leading_shape != self.leading_shape:
                raise VpdError(
                    f"PPGD sources have batch-slot shape {self.leading_shape}, fixed by the first batch, but this "
                    f"batch has {leading_shape}. Persistent sources are never re-initialised: keep the batch "
                    "shape constant (drop the last incomplete batch)."
                )
            return
        # Draw on the generator's device, then move, so a CPU generator gives the same sources anywhere.
        gen_device = self.generator.device if self.generator is not None else device
        for path, C in self.Cs.items():
            s = torch.rand(*leading_shape, C + 1, generator=self.generator, device=gen_device, dtype=torch.float32)
            self.sources[path] = s.to(device=device, dtype=dtype).requires_grad_(True)
            self._exp_avg[path] = torch.zeros_like(self.sources[path])
            self._exp_avg_sq[path] = torch.zeros_like(self.sources[path])
        numel = sum(s.numel() for s in self.sources.values())
        logger.info("ppgd: sources of slot shape %s for %d matrices, %d values", leading_shape, len(self.Cs), numel)

    def source_list(self) -> list[Tensor]:
        """The source tensors in module order, e.g. as the `inputs` of `torch.autograd.grad`."""
        return [self.sources[path] for path in self.Cs]

    def masks(self, g: Mapping[str, Tensor]) -> tuple[Masks, Masks]:
        """`(masks, delta_masks)` from the current sources, creating them if this is the first batch.

        Gradients reach `g` (unless detached) and the sources.

        Raises:
            VpdError: The batch shape differs from the first, or `g` does not fit the sources.
        """
        if set(g) != set(self.Cs):
            raise VpdError(f"`g` has paths {sorted(g)} but the PPGD sources are for {sorted(self.Cs)}.")
        first = next(iter(g.values()))
        self.ensure_sources(tuple(first.shape[:-1]), first.device)
        return sources_to_masks(g, self.sources)

    @torch.no_grad()
    def ascend(self, grads: Mapping[str, Tensor | None] | Sequence[Tensor | None], step: int) -> None:
        """One Adam ascent step s ← clamp(s + lr·m̂/(√v̂ + eps), 0, 1), in place.

        Call it only after every backward through a graph that used the sources, because the in-place
        update invalidates such graphs. It also clears the sources' `.grad`, which a main backward fills.

        Args:
            grads: ∂L_adv/∂s per path, or a list in module order; None means a zero gradient.
            step: The training step, for the lr warm-up.

        Raises:
            VpdError: No sources exist yet, or `grads` does not match them.
        """
        if not self.sources:
            raise VpdError("PPGD has no sources yet. Call `masks(g)` on a batch before `ascend`.")
        if not isinstance(grads, Mapping):
            if len(grads) != len(self.Cs):
                raise VpdError(f"`grads` has {len(grads)} entries; pass one per matrix ({len(self.Cs)}).")
            grads = dict(zip(self.Cs, grads, strict=True))
        if set(grads) != set(self.Cs):
            raise VpdError(f"`grads` has paths {sorted(grads)}; pass one per matrix: {sorted(self.Cs)}.")
        lr = self.lr_at(step)
        beta1, beta2 = self.config.betas
        self.t += 1
        bias1, bias2 = 1.0 - beta1**self.t, 1.0 - beta2**self.t
        for path, s in self.sources.items():
            grad = grads[path]
            if grad is None:
                grad = torch.zeros_like(s)
            assert grad.shape == s.shape, f"grads[{path!r}] {tuple(grad.shape)} != sources {tuple(s.shape)}"
            m, v = self._exp_avg[path], self._exp_avg_sq[path]
            m.lerp_(grad, 1.0 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = (v / bias2).sqrt_().add_(self.config.eps)
            s.addcdiv_(m, denom, value=lr / bias1).clamp_(0.0, 1.0)  # + : ascent
            s.grad = None

    def warmup(self, loss_fn: LossFn, g: Mapping[str, Tensor], step: int) -> float | None:
        """`config.warmup_ascents` Adam ascents on the current batch, with g detached.

        Args:
            loss_fn: `(masks, delta_masks) → L_adv`, a scalar to be maximised.
            g: Path → causal importance of the current batch; it is detached here.
            step: The training step, for the lr warm-up.

        Returns:
            The loss at the sources before the last ascent, or None when `warmup_ascents` is 0.
        """
        g = {path: g_l.detach() for path, g_l in g.items()}
        last = None
        for _ in range(self.config.warmup_ascents):
            with torch.enable_grad():
                loss = loss_fn(*self.masks(g))
                grads = _grad_list(loss, self.source_list())
            self.ascend(grads, step)
            last = float(loss.detach())
        return last

    def state_tensors(self) -> dict[str, Tensor]:
        """Sources, Adam moments and step count as a flat dict for safetensors (detached views, not copies)."""
        state = {"t": torch.tensor(self.t, dtype=torch.int64)}
        for path, s in self.sources.items():
            state[f"sources.{path}"] = s.detach()
            state[f"exp_avg.{path}"] = self._exp_avg[path]
            state[f"exp_avg_sq.{path}"] = self._exp_avg_sq[path]
        return state

    def load_state_tensors(self, tensors: Mapping[str, Tensor], *, device: torch.device | str | None = None) -> None:
        """Restore `state_tensors()` output (copied), so the ascent continues bit-identically.

        Raises:
            VpdError: Keys are missing or unknown, or a shape does not fit `Cs`.
        """
        kinds = ("sources", "exp_avg", "exp_avg_sq")
        has_sources = any(key.startswith("sources.") for key in tensors)
        expected = {"t"} | ({f"{k}.{p}" for k in kinds for p in self.Cs} if has_sources else set())
        if set(tensors) != expected:
            missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise VpdError(
                f"PPGD state has missing keys {missing[:5]} and unknown keys {unknown[:5]}. "
                "Load a state saved by a PersistentPGD over the same decomposed matrices."
            )
        loaded: dict[str, dict[str, Tensor]] = {k: {} for k in kinds}
        to_load = self.Cs if has_sources else {}  # a state saved before the first batch holds only `t`
        lead = tensors[f"sources.{next(iter(self.Cs))}"].shape[:-1] if has_sources else ()
        for path, C in to_load.items():
            for kind in kinds:
                tensor = tensors[f"{kind}.{path}"]
                if tensor.shape != (*lead, C + 1):
                    raise VpdError(
                        f"PPGD state `{kind}.{path}` has shape {tuple(tensor.shape)}; expected {(*lead, C + 1)}."
                    )
                loaded[kind][path] = tensor.detach().to(device=device, copy=True)
        self.sources = {p: s.requires_grad_(True) for p, s in loaded["sources"].items()}
        self._exp_avg, self._exp_avg_sq = loaded["exp_avg"], loaded["exp_avg_sq"]
        self.t = int(tensors["t"])


def fresh_pgd_sources(
    Cs: Mapping[str, int],
    leading_shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """U(0, 1) sources of shape (*leading_shape, C + 1) per path, as float32 leaves that require grad."""
    gen_device = generator.device if generator is not None else device
    return {
        path: torch.rand(*leading_shape, C + 1, generator=generator, device=gen_device).to(device).requires_grad_(True)
        for path, C in Cs.items()
    }


def sign_ascent(
    loss_fn: Callable[[], Tensor],
    sources: Sequence[Tensor],
    *,
    n_steps: int,
    step_size: float,
    movable: Sequence[Tensor] | None = None,
    reduce_grad: Callable[[Tensor], Tensor] | None = None,
    losses: list[float] | None = None,
) -> None:
    """Sign-gradient PGD in place: `n_steps` of s ← clamp(s + step_size·sign(∇s loss), 0, 1).

    The one ascent behind `fresh_pgd` and the per-prompt adversary of `attrgraph.optimize.pgd_sources`.

    Args:
        loss_fn: `() → loss`, the scalar to maximise, read from the current `sources`.
        sources: Float leaves that require grad; moved in place.
        n_steps: Sign steps.
        step_size: Size of each sign step.
        movable: Per source, a bool mask that broadcasts to it: only these entries move. None: all move.
        reduce_grad: Applied to every source gradient before the sign, e.g. a DDP all-reduce (AVG).
        losses: When given, the loss at every iterate 0 … n_steps − 1 is appended to it.
    """
    with torch.enable_grad():  # the eval probe runs under no_grad
        for _ in range(n_steps):
            loss = loss_fn()
            if losses is not None:
                losses.append(float(loss.detach()))
            grads = _grad_list(loss, list(sources))
            with torch.no_grad():
                for i, (s, grad) in enumerate(zip(sources, grads, strict=True)):
                    grad = reduce_grad(grad) if reduce_grad is not None else grad
                    if movable is None:
                        s.add_(grad.sign(), alpha=step_size).clamp_(0.0, 1.0)
                    else:
                        s.copy_(torch.where(movable[i], (s + step_size * grad.sign()).clamp(0.0, 1.0), s))


def fresh_pgd(
    model_fn: LossFn,
    g: Mapping[str, Tensor],
    Cs: Mapping[str, int],
    *,
    n_steps: int,
    step_size: float,
    generator: torch.Generator | None = None,
    shared: bool = True,
    leading_ndim: int | None = None,
    reduce_grad: Callable[[Tensor], Tensor] | None = None,
    sources: Mapping[str, Tensor] | None = None,
    losses: list[float] | None = None,
) -> tuple[Masks, Masks, float]:
    """Fresh PGD: re-drawn sources, `n_steps` of s ← clamp(s + step_size·sign(∇s), 0, 1).

    Args:
        model_fn: `(masks, delta_masks) → loss`, the scalar to maximise (e.g. the mean KL, all routed).
        g: Path → causal importance (..., C); detached for the ascent.
        Cs: Path → C.
        n_steps: Sign-ascent steps, ≥ 0.
        step_size: Size of each sign step, > 0.
        generator: Draws the U(0, 1) initial sources.
        shared: Sources shared across batch and positions (1, …, 1, C + 1); otherwise one per slot.
        leading_ndim: Leading dims of shared sources; None takes `g`'s (2 for (B, T, C), 1 for toys).
        reduce_grad: Applied to every source gradient before the sign, e.g. a DDP all-reduce (AVG).
        sources: Initial sources to use instead of drawing them (e.g. broadcast from rank 0); not modified.
        losses: When given, the loss at every iterate 0 … n_steps is appended to it (the last is `final_loss`),
            so one run of n steps also answers every shorter run from the same draw.

    Returns:
        `(masks, delta_masks, final_loss)`: masks from the final, detached sources and the *live* `g`,
        so a training loss built from them trains the CI function; and the loss after the last step.

    Raises:
        VpdError: `n_steps` < 0 or `step_size` ≤ 0, or the sources do not fit `g`.
    """
    if n_steps < 0 or step_size <= 0:
        raise VpdError(f"`n_steps` must be ≥ 0 and `step_size` > 0; got {n_steps} and {step_size}. E.g. 20 and 0.1.")
    first = next(iter(g.values()))
    if sources is not None:
        sources = {path: s.detach().clone().requires_grad_(True) for path, s in sources.items()}
    else:
        lead = (1,) * (first.ndim - 1 if leading_ndim is None else leading_ndim) if shared else first.shape[:-1]
        sources = fresh_pgd_sources(Cs, tuple(lead), generator=generator, device=first.device)
    g_detached = {path: g_l.detach() for path, g_l in g.items()}
    sign_ascent(
        lambda: model_fn(*sources_to_masks(g_detached, sources)),
        list(sources.values()),
        n_steps=n_steps,
        step_size=step_size,
        reduce_grad=reduce_grad,
        losses=losses,
    )
    final = {path: s.detach() for path, s in sources.items()}
    masks, delta_masks = sources_to_masks(g, final)
    with torch.no_grad():
        final_loss = float(model_fn(masks, delta_masks))
    if losses is not None:
        losses.append(final_loss)
    return masks, delta_masks, final_loss

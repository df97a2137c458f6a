"""The LoRA baseline for a subcomponent edit (docs/attribution-graphs.md §11), and the Pareto figure.

A rank-r adapter ΔW = B A on the edited matrix is trained on n windows of held-out text (each a firing
token ± 20) with loss

    CE(o) at the firing positions + λ · KL(p_target ‖ p_lora) on every other position,

then merged into a copy of the target (W + B A), which is compared with the edit on the same metrics.
The adapter runs as a forward hook on one module, so no adapter library is needed; B starts at 0, which
makes the hooked model start exactly at the target.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from circuits.edit.metrics import EditMetrics, EditPoint, edit_metrics
from decomposer.errors import VpdError
from decomposer.io import atomic_write_bytes
from decomposer.vpd.targets import read_weight


class LoraAdapter(nn.Module):
    """ΔW = B A (d_out, d_in) on one matrix; the adapter's output for input x is x Aᵀ Bᵀ.

    Args:
        d_in: Input size of the matrix.
        d_out: Output size of the matrix.
        rank: r.
        generator: Random source for A ~ N(0, 1/d_in); B starts at 0.
        dtype: Parameter dtype.
        device: Parameter device.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        A = torch.randn(rank, d_in, generator=generator, dtype=dtype) / math.sqrt(d_in)
        self.A = nn.Parameter(A.to(device))
        self.B = nn.Parameter(torch.zeros(d_out, rank, dtype=dtype, device=device))

    def delta_weight(self) -> Tensor:
        """B A in nn.Linear layout, (d_out, d_in)."""
        return self.B @ self.A

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.T) @ self.B.T


def _module(model: nn.Module, path: str) -> nn.Module:
    names = {name for name, _ in model.named_modules()}
    if path not in names:
        raise VpdError(
            f"`module` {path!r} is not a module of the target; pass a path such as model.layers.2.mlp.down_proj."
        )
    return model.get_submodule(path)


@contextmanager
def attached(model: nn.Module, path: str, adapter: LoraAdapter) -> Iterator[nn.Module]:
    """Run `model` with `adapter`'s output added to the output of the module at `path`, for the `with` block."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        return output + adapter(x)

    handle = _module(model, path).register_forward_hook(hook, with_kwargs=True)
    try:
        yield model
    finally:
        handle.remove()


def merge(model: nn.Module, path: str, adapter: LoraAdapter) -> nn.Module:
    """A copy of `model` whose matrix at `path` is W + B A: an ordinary model without hooks."""
    merged = copy.deepcopy(model)
    W, _ = read_weight(_module(merged, path))  # a view of the copy's parameter
    with torch.no_grad():
        W.add_(adapter.delta_weight().detach().to(W))
    return merged


def lora_windows(ids: Tensor, firing: Tensor, n: int, *, window: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n training windows of length min(2·window + 1, seq), each centred on a distinct firing position.

    Windows are clamped to their row, so a firing token near an end sits off-centre. Fewer than n come back
    when `firing` has fewer than n positions.

    Args:
        ids: Token ids (batch, seq).
        firing: Bool (batch, seq), where the subcomponent fires.
        n: Windows wanted.
        window: Half-width.
        seed: Seed of the choice of firing positions.

    Returns:
        Window ids (n, L) and the firing mask on them (n, L), which marks every firing position in a window.

    Raises:
        VpdError: `firing` selects no position, or `n` < 1.
    """
    if not isinstance(n, int) or n < 1:
        raise VpdError(f"`n` must be a positive number of windows; got {n!r}.")
    where = torch.nonzero(firing)  # (F, 2) rows of (b, t)
    if len(where) == 0:
        raise VpdError("`firing` selects no position, so there is no window to train on; pass more text.")
    pick = where[torch.randperm(len(where), generator=torch.Generator().manual_seed(seed))[:n]]
    T = ids.shape[1]
    L = min(2 * window + 1, T)
    starts = (pick[:, 1] - window).clamp(0, T - L)
    cols = starts[:, None] + torch.arange(L)[None, :]
    rows = pick[:, 0:1].expand_as(cols)
    return ids[rows, cols], firing[rows, cols]


@dataclass(frozen=True)
class LoraStep:
    """One optimisation step: total loss, CE toward o at firing positions, KL to the target elsewhere."""

    step: int
    loss: float
    ce: float
    kl: float


@dataclass
class LoraResult:
    """The merged model, the adapter, the training curve and the settings."""

    model: nn.Module
    adapter: LoraAdapter
    curve: list[LoraStep]
    settings: dict


def lora_loss(
    logits: Tensor, target_logits: Tensor, firing: Tensor, token_id: int, lam: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(CE + λ·KL, CE, KL): mean −log p(o) over firing positions, mean KL(p_target ‖ p) over the others."""
    logp = torch.log_softmax(logits, -1)
    logp_t = torch.log_softmax(target_logits, -1)
    zero = logits.new_zeros(())
    ce = -logp[..., token_id][firing].mean() if firing.any() else zero
    kl_pos = (logp_t.exp() * (logp_t - logp)).sum(-1)
    kl = kl_pos[~firing].mean() if (~firing).any() else zero
    return ce + lam * kl, ce, kl


def train_lora(
    target: nn.Module,
    module: str,
    windows: Tensor,
    window_firing: Tensor,
    token_id: int,
    *,
    rank: int = 1,
    lam: float = 1.0,
    steps: int = 200,
    lr: float = 5e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> LoraResult:
    """Train a rank-`rank` LoRA on the matrix at `module` with AdamW; the target itself is not modified.

    Args:
        target: The HF model; it returns `.logits`.
        module: Path of the adapted matrix, e.g. `model.layers.2.mlp.down_proj`.
        windows: Training token ids (n, L), e.g. from `lora_windows`.
        window_firing: Bool (n, L): positions trained toward `token_id`; all others are held to the target by KL.
        token_id: The token o.
        rank: LoRA rank r.
        lam: λ, the weight of the KL term.
        steps: Optimisation steps.
        lr: AdamW learning rate.
        batch_size: Windows per step (all of them when there are fewer).
        weight_decay: AdamW weight decay.
        seed: Seeds A's initialisation and the minibatch order.
        progress: Show a tqdm bar.

    Returns:
        The merged model (W + B A), the adapter and the per-step curve.

    Raises:
        VpdError: An unknown `module`, mismatched or empty windows, no firing position, or a bad rank, λ or step count.
    """
    from tqdm.auto import tqdm

    layer = _module(target, module)
    W, _ = read_weight(layer)
    d_out, d_in = W.shape
    if windows.ndim != 2 or window_firing.shape != windows.shape or window_firing.dtype != torch.bool:
        raise VpdError(
            f"`windows` (n, L) and `window_firing` (bool, same shape) must match; got {tuple(windows.shape)} and "
            f"{window_firing.dtype} {tuple(window_firing.shape)}."
        )
    if not window_firing.any():
        raise VpdError("`window_firing` marks no position, so there is nothing to train toward; use `lora_windows`.")
    if not isinstance(rank, int) or rank < 1:
        raise VpdError(f"`rank` must be an int ≥ 1; got {rank!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise VpdError(f"`steps` must be an int ≥ 1; got {steps!r}.")
    if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise VpdError(f"`lam` must be a finite number ≥ 0; got {lam!r}.")

    gen = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter(d_in, d_out, rank, generator=gen, dtype=W.dtype, device=W.device)
    # Gradients must reach only the adapter, so train through a frozen copy rather than the caller's model.
    work = copy.deepcopy(target).requires_grad_(False).eval()
    target.eval()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(windows)
    order = torch.randperm(n, generator=gen)
    cursor, curve = 0, []
    bar = tqdm(range(steps), desc=f"lora r={rank} λ={lam:g} n={n}", disable=not progress, leave=False)
    with attached(work, module, adapter):
        for step in bar:
            if cursor + min(batch_size, n) > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor : cursor + batch_size]
            cursor += len(idx)
            batch, fire = windows[idx].to(W.device), window_firing[idx].to(W.device)
            with torch.no_grad():
                reference = target(batch).logits
            loss, ce, kl = lora_loss(work(batch).logits, reference, fire, token_id, lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            curve.append(LoraStep(step, *(float(t.detach()) for t in (loss, ce, kl))))
            bar.set_postfix(loss=f"{curve[-1].loss:.4f}", refresh=False)
    settings = {
        "module": module,
        "rank": rank,
        "lam": lam,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "seed": seed,
        "n_windows": n,
        "window_len": windows.shape[1],
    }
    return LoraResult(merge(work, module, adapter), adapter, curve, settings)


@dataclass(frozen=True)
class LoraPoint:
    """One trained LoRA of a sweep: its settings, final training loss and metrics on the evaluation text."""

    rank: int
    n: int
    n_windows: int
    lam: float
    final_loss: float
    metrics: EditMetrics


class LoraSweep(BaseModel):
    """The LoRA baseline of an edit study: one adapter per rank × n × λ (the defaults are the paper's grid).

    Attributes:
        ns: Training-window counts n (capped at the firings found).
        lambdas: KL weights λ.
        ranks: LoRA ranks.
        steps: AdamW steps per adapter.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ns: tuple[int, ...] = (10, 947)
    lambdas: tuple[float, ...] = (0.1, 1.0, 10.0)
    ranks: tuple[int, ...] = (1, 4)
    steps: int = Field(200, ge=1)


def lora_sweep(
    ns: Sequence[int],
    lambdas: Sequence[float],
    *,
    target: nn.Module,
    module: str,
    train_ids: Tensor,
    train_firing: Tensor,
    eval_ids: Tensor,
    eval_firing: Tensor,
    token_id: int,
    ranks: Sequence[int] = (1,),
    window: int = 20,
    seed: int = 0,
    progress: bool = False,
    **train_kwargs: Any,
) -> list[LoraPoint]:
    """Train one LoRA per (rank, n, λ) on windows of `train_ids` and measure each on `eval_ids`.

    Args:
        ns: Numbers of training windows; each is capped at the firings available in `train_firing`.
        lambdas: KL weights λ.
        target: The HF model.
        module: Path of the adapted matrix.
        train_ids, train_firing: Text (batch, seq) and firing mask the windows are cut from.
        eval_ids, eval_firing: Held-out text and firing mask for `edit_metrics`.
        token_id: The token o.
        ranks: LoRA ranks.
        window: Half-width of training windows and of D_KL,Surrounding.
        seed: Seed of window choice and training.
        progress: Show a tqdm bar over the sweep.
        **train_kwargs: Passed to `train_lora` (steps, lr, batch_size, weight_decay).

    Returns:
        One `LoraPoint` per (rank, n, λ), in that nesting order.
    """
    from tqdm.auto import tqdm

    grid = [(r, n, lam) for r in ranks for n in ns for lam in lambdas]
    points = []
    for r, n, lam in tqdm(grid, desc="lora sweep", disable=not progress):
        windows, fire = lora_windows(train_ids, train_firing, n, window=window, seed=seed)
        result = train_lora(
            target, module, windows, fire, token_id, rank=r, lam=lam, seed=seed, progress=progress, **train_kwargs
        )
        metrics = edit_metrics(target, result.model, eval_ids, eval_firing, token_id, window)
        points.append(LoraPoint(r, n, len(windows), float(lam), result.curve[-1].loss, metrics))
    return points


def pareto_plot(edit_points: Sequence[EditPoint], lora_points: Sequence[LoraPoint], path: str | Path) -> Path:
    """P(o) at firing positions against D_KL,Surrounding and D_KL,Global: the edit over α, LoRA over n and λ.

    Written as a PNG, atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    groups: dict[tuple[int, int], list[LoraPoint]] = {}
    for p in lora_points:
        groups.setdefault((p.rank, p.n_windows), []).append(p)
    reference = next((p.metrics.efficacy_target for p in [*edit_points, *lora_points]), None)
    for ax, attr, title in ((axes[0], "kl_surrounding", "D_KL,Surrounding"), (axes[1], "kl_global", "D_KL,Global")):
        edits = sorted(edit_points, key=lambda p: p.alpha)
        xs = [getattr(p.metrics, attr) for p in edits]
        ax.plot(xs, [p.metrics.efficacy for p in edits], "o-", color="black", label="edit (α sweep)")
        for p, x in zip(edits, xs, strict=True):
            ax.annotate(
                f"α={p.alpha:g}", (x, p.metrics.efficacy), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        for i, ((rank, n), pts) in enumerate(sorted(groups.items())):
            pts = sorted(pts, key=lambda p: p.lam)
            xs_l = [getattr(p.metrics, attr) for p in pts]
            ax.plot(
                xs_l,
                [p.metrics.efficacy for p in pts],
                linestyle="--",
                marker="sD^v"[i % 4],
                color=f"C{i}",
                label=f"LoRA r={rank}, n={n} (λ sweep)",
            )
            for p, x in zip(pts, xs_l, strict=True):
                ax.annotate(
                    f"λ={p.lam:g}",
                    (x, p.metrics.efficacy),
                    textcoords="offset points",
                    xytext=(4, -9),
                    fontsize=7,
                    color=f"C{i}",
                )
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle=":", label="target P(o)")
        positive = [v for v in [*xs, *(getattr(p.metrics, attr) for p in lora_points)] if v > 0 and math.isfinite(v)]
        # symlog keeps an exact 0 (α = 0 with no change, or an untouched region) on the axis.
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1e-6)
        ax.set_xlim(left=0)  # KL ≥ 0; symlog would otherwise draw an empty negative half
        ys = [p.metrics.efficacy for p in [*edit_points, *lora_points] if p.metrics.efficacy > 0]
        if ys and min(ys) < 1e-2 * max(ys):  # a weak edit next to a strong LoRA is invisible on a linear axis
            ax.set_yscale("log")
        ax.set_xlabel(f"{title} (nats)")
        ax.set_ylabel("P(o) at firing positions")
        ax.set_title(f"efficacy vs {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())

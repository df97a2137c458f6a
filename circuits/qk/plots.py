"""PNG figures of the static q/k analysis (`circuits.qk`): the static strength of a pair, and what ablating a q
subcomponent does to the attention pattern and to the attention by offset.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from attrgraph.nodes import ComponentKey
from decomposer.errors import VpdError
from decomposer.io import atomic_write_bytes

if TYPE_CHECKING:
    from circuits.qk.static import AblationEffect, StaticStrength

__all__ = ["plot_attention_ablation", "plot_offset_attention", "plot_static_strength"]


def _figure(width: float, height: float) -> Any:
    # The Agg canvas directly, not pyplot: no global backend switch and no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _heat(fig: Any, ax: Any, values: Tensor, *, title: str, xlabel: str, ylabel: str, **kwargs: Any) -> None:
    image = ax.imshow(values.numpy(), aspect="auto", origin="upper", interpolation="nearest", **kwargs)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8)


def plot_static_strength(strength: StaticStrength, q_index: int, k_index: int, path: str | Path) -> Path:
    """Heat-map (heads × τ) of the z-scored static strength of one q/k pair; returns the PNG written."""
    z = strength.z[:, :, q_index, k_index]
    fig = _figure(1.2 + 0.35 * z.shape[1], 1.0 + 0.4 * z.shape[0])
    ax = fig.add_subplot()
    bound = float(z.abs().max()) or 1.0
    q_key, k_key = str(ComponentKey.of(strength.q_path, q_index)), str(ComponentKey.of(strength.k_path, k_index))
    _heat(
        fig,
        ax,
        z,
        title=f"static strength z: {q_key} × {k_key}",
        xlabel="offset τ = t − t′",
        ylabel="head",
        cmap="RdBu_r",
        vmin=-bound,
        vmax=bound,
    )
    ax.set_xticks(range(z.shape[1]))
    ax.set_xticklabels([str(int(t)) for t in strength.offsets], fontsize=7)
    ax.set_yticks(range(z.shape[0]))
    return _save(fig, path)


def plot_attention_ablation(effect: AblationEffect, path: str | Path, *, sample: int = 0) -> Path:
    """Attention patterns of one sample, every head, before (top row) and after (bottom row) the ablation."""
    if not 0 <= sample < effect.before.shape[0]:
        raise VpdError(f"`sample` must be in 0..{effect.before.shape[0] - 1}; got {sample!r}.")
    H = effect.before.shape[1]
    fig = _figure(2.6 * H, 5.2)
    for row, (name, attn) in enumerate((("before", effect.before), ("after", effect.after))):
        for h in range(H):
            ax = fig.add_subplot(2, H, row * H + h + 1)
            ax.imshow(attn[sample, h].numpy(), vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            ax.set_title(f"head {h} {name}", fontsize=8)
            ax.set_xlabel("key t′", fontsize=7)
            ax.set_ylabel("query t", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.suptitle(f"layer {effect.layer} attention, ablating {effect.q_key}", fontsize=10)
    return _save(fig, path)


def plot_offset_attention(effect: AblationEffect, path: str | Path) -> Path:
    """Heat-maps (heads × τ) of the mean attention by offset before and after the ablation, and the change."""
    n_tau = effect.mean_before.shape[1]
    fig = _figure(3 * (1.2 + 0.3 * n_tau), 1.2 + 0.4 * effect.mean_before.shape[0])
    change = effect.mean_after - effect.mean_before
    bound = float(change.abs().max()) or 1.0
    panels = (
        ("before", effect.mean_before, {"vmin": 0, "vmax": 1, "cmap": "viridis"}),
        ("after", effect.mean_after, {"vmin": 0, "vmax": 1, "cmap": "viridis"}),
        ("after − before", change, {"vmin": -bound, "vmax": bound, "cmap": "RdBu_r"}),
    )
    for i, (name, values, style) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        _heat(fig, ax, values, title=f"mean attention {name}", xlabel="offset τ", ylabel="head", **style)
        ax.set_xticks(range(n_tau))
        ax.set_yticks(range(values.shape[0]))
    fig.suptitle(f"layer {effect.layer}, ablating {effect.q_key}", fontsize=10)
    return _save(fig, path)

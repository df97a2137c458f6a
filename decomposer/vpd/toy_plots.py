"""The toy figures: each matrix's U·V next to its true pieces, and CI against a lone feature's value."""

from __future__ import annotations

from pathlib import Path

import torch

from decomposer.vpd.run import Decomposition
from decomposer.vpd.toy_score import ci_of, ground_truth

MAX_SHOWN = 40  # pieces drawn per matrix; larger toys show their first 40


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pieces(d: Decomposition, result: dict, path: str | Path) -> Path:
    """Per matrix: the target W, the sum of its alive subcomponents, and each piece next to its match.

    The third panel shows, for up to `MAX_SHOWN` pieces, the piece's write direction (left half of a row) and its
    matched subcomponent's u_c (right half), scaled to unit norm; a recovered toy shows two equal halves.
    """
    plt = _pyplot()
    target = d.model.target
    n = target.n_features
    eye = torch.eye(n)
    with torch.no_grad():
        _, signed_xs = d.model.forward_with_inputs(torch.cat([eye, -eye]))
        mats_of = {
            p: torch.einsum("co,ic->oi", d.model.components(p).U, d.model.components(p).V) for p in d.module_paths
        }
    paths = d.module_paths
    fig, axes = plt.subplots(len(paths), 3, figsize=(10, 2.6 * len(paths)), squeeze=False)
    for row, p in zip(axes, paths, strict=True):
        comp = d.model.components(p)
        W = comp.weight.detach()
        stats = result["matrices"][p]
        found = result["matches"][p]
        mats = mats_of[p]
        limit = float(W.abs().max())
        row[0].imshow(W.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        row[0].set_title(f"{p}: target W", fontsize=8)
        row[1].imshow(mats.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        row[1].set_title(f"U·V (all {comp.C}); alive {stats['alive']}", fontsize=8)
        pieces = ground_truth(target, p, signed_xs)
        if pieces.writes is None:
            row[2].text(0.5, 0.5, f"dense: rank {pieces.rank}", ha="center", va="center")
            row[2].set_axis_off()
            continue
        k = min(MAX_SHOWN, len(found))
        writes = pieces.writes[:k] / pieces.writes[:k].norm(dim=1, keepdim=True).clamp_min(1e-12)
        matched = torch.zeros_like(writes)
        for i, c in enumerate(found[:k]):
            if c is not None:
                u = comp.U[c].detach()
                matched[i] = u * torch.sign(u @ writes[i]) / u.norm().clamp_min(1e-12)
        row[2].imshow(torch.cat([writes, matched], dim=1).numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        row[2].axvline(writes.shape[1] - 0.5, color="k", lw=0.8)
        row[2].set_title(
            f"true write | matched u_c: {stats['recovered']}/{stats['pieces']} {stats['kind']}", fontsize=8
        )
        row[2].set_ylabel("piece", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_ci_vs_value(d: Decomposition, result: dict, path: str | Path, *, low: float = 0.0) -> Path:
    """Per feature matrix: CI of each feature's matched subcomponent as that feature alone sweeps (low, 1].

    Solid lines are the matched subcomponents on their own feature; the dashed line is the largest CI of any
    other subcomponent of the matrix on the same inputs.
    """
    plt = _pyplot()
    target = d.model.target
    n = target.n_features
    values = torch.linspace(low, 1.0, 41)
    feature_paths = [p for p in d.module_paths if result["matrices"][p]["kind"] == "features"]
    fig, axes = plt.subplots(1, max(1, len(feature_paths)), figsize=(3.4 * max(1, len(feature_paths)), 2.8))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, p in zip(axes, feature_paths, strict=False):
        found = result["matches"][p]
        own = torch.full((n, len(values)), float("nan"))
        other = torch.zeros(len(values))
        for j, v in enumerate(values.tolist()):
            G = ci_of(d, v * torch.eye(n))[p]  # (feature on, C)
            mask = torch.ones_like(G, dtype=torch.bool)
            for i, c in enumerate(found):
                if c is not None:
                    own[i, j] = G[i, c]
                    mask[i, c] = False
            other[j] = G[mask].max()
        for i in range(min(n, MAX_SHOWN)):
            ax.plot(values.numpy(), own[i].numpy(), lw=0.8)
        ax.plot(values.numpy(), other.numpy(), "k--", lw=1, label="max other")
        ax.set_title(p, fontsize=8)
        ax.set_xlabel("feature value", fontsize=8)
        ax.set_ylabel("CI", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

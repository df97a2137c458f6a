"""PNG plots of a run: loss curves, L0 per matrix, and the sorted mean-CI spectrum of every matrix."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from decomposer.vpd.run import METRICS_FILE, PLOTS_DIR, Decomposition

LOSS_KEYS = ("total", "faithfulness", "stochastic", "adversarial", "importance", "frequency", "l0")


@torch.no_grad()
def ci_statistics(d: Decomposition, batches: Sequence[Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """One pass over `batches`: mean CI per subcomponent (path → (C,)) and L0 per matrix (path → mean #g > 0)."""
    ci_sums: dict[str, Tensor] = {}
    l0_sums: dict[str, float] = {}
    count = 0
    for batch in batches:
        for p, g_l in d.network_ci(batch).items():
            flat = g_l.reshape(-1, g_l.shape[-1])
            ci_sums[p] = ci_sums.get(p, 0) + flat.sum(0)
            l0_sums[p] = l0_sums.get(p, 0.0) + float((flat > 0).sum())
        count += flat.shape[0]
    return {p: s / count for p, s in ci_sums.items()}, {p: s / count for p, s in l0_sums.items()}


def plot_run(run_dir: str | Path, d: Decomposition, batches: Sequence[Tensor] | None) -> list[Path]:
    """Write `plots/losses.png`, `plots/l0.png` and (with batches) `plots/ci_spectrum.png`; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    folder = run_dir / PLOTS_DIR
    folder.mkdir(exist_ok=True)
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line]
    written = []

    fig, axes = plt.subplots(1, len(LOSS_KEYS), figsize=(3 * len(LOSS_KEYS), 2.8))
    steps = [r["step"] for r in records]
    for ax, key in zip(axes, LOSS_KEYS, strict=True):
        values = [r[key] for r in records]
        ax.plot(steps, values, lw=1)
        if key not in ("l0",) and all(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "losses.png", dpi=110)
    plt.close(fig)
    written.append(folder / "losses.png")

    if batches:
        ci, l0 = ci_statistics(d, batches[:2])
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(ci)), 3))
        names = list(ci)
        ax.bar(range(len(names)), [l0[p] for p in names])
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_ylabel("L0 (mean #CI > 0 per position)")
        fig.tight_layout()
        fig.savefig(folder / "l0.png", dpi=110)
        plt.close(fig)
        written.append(folder / "l0.png")

        fig, ax = plt.subplots(figsize=(6, 4))
        for p, values in ci.items():
            ax.plot(torch.sort(values, descending=True).values.clamp_min(1e-12).cpu().numpy(), lw=1, label=p)
        ax.set_yscale("log")
        ax.set_xlabel("subcomponent rank")
        ax.set_ylabel("mean CI")
        ax.legend(fontsize=5, ncol=2)
        fig.tight_layout()
        fig.savefig(folder / "ci_spectrum.png", dpi=110)
        plt.close(fig)
        written.append(folder / "ci_spectrum.png")
    return written

"""The clusters artifact: `clusters.json` (format name and version here, written atomically) and `clusters.png`.

Written by `vpd cluster` from a `circuits.cluster.mdl.Clustering`; `load_clusters` checks the format version.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from decomposer.errors import ArtifactFormatError, VpdError
from decomposer.io import atomic_write_json

if TYPE_CHECKING:
    from circuits.cluster.mdl import Clustering


FORMAT = "component_clusters"
FORMAT_VERSION = 1


def save_clusters(result: Clustering, path: str | Path) -> Path:
    """Write the clustering as JSON (atomically): key → cluster id, members, costs and merge history."""
    clusters = result.clusters
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "alpha": result.alpha,
        "tau": result.tau,
        "n_tokens": result.n_tokens,
        "within_matrix": result.within_matrix,
        "stopped": result.stopped,
        "n_subcomponents": len(result.keys),
        "n_clusters": len(clusters),
        "cost": {"initial": result.cost_initial, "final": result.cost},
        "mapping": result.mapping,
        "clusters": [
            {"id": k, "members": clusters[k], "tokens": result.tokens[k], "rank": result.ranks[k]}
            for k in sorted(clusters)
        ],
        "history": [
            {"a": result.keys[m.a], "b": result.keys[m.b], "delta": m.delta, "cost": m.cost, "tokens": m.tokens}
            for m in result.history
        ],
    }
    return atomic_write_json(path, payload)


def load_clusters(path: str | Path) -> dict:
    """Read a `save_clusters` file; `["mapping"]` is the key → cluster id map for `group_graph`.

    Raises:
        VpdError: The file does not exist.
        ArtifactFormatError: It is not a clusters file of a version this release reads.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise VpdError(f"Clusters file {str(path)!r} does not exist. Write one with `vpd cluster`.")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ArtifactFormatError(
            f"{path} has format {data.get('format')!r} version {data.get('format_version')!r}, but this release "
            f"reads {FORMAT!r} version {FORMAT_VERSION}. Upgrade the package."
        )
    return data


def plot_clusters(result: Clustering, path: str | Path) -> Path:
    """PNG: L(P) over the merges and the distribution of cluster sizes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from decomposer.io import atomic_write_bytes

    fig, (ax_cost, ax_size) = plt.subplots(1, 2, figsize=(10, 3.6))
    costs = [result.cost_initial] + [m.cost for m in result.history]
    ax_cost.plot(range(len(costs)), costs)
    ax_cost.set_xlabel("merges")
    ax_cost.set_ylabel("L(P) [bits]")
    ax_cost.set_title(f"α = {result.alpha:g}, {result.n_tokens:,} tokens ({result.stopped})")
    sizes = [len(m) for m in result.clusters.values()]
    ax_size.hist(sizes, bins=range(1, max(sizes) + 2), align="left")
    ax_size.set_xlabel("subcomponents per cluster")
    ax_size.set_ylabel("clusters")
    ax_size.set_yscale("log")
    ax_size.set_title(f"{len(result.keys):,} subcomponents → {len(sizes):,} clusters")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())

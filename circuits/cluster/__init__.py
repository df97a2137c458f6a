"""Subcomponents merged into components by description length on co-firing, and what is built on the result.

- `mdl`: the firing matrix over held-out text and the greedy merge (`cluster` → `Clustering`);
- `files`: the clusters artifact, `clusters.json` and `clusters.png`;
- `graph`: `group_graph`, an attribution graph with each (cluster, position) collapsed into one node.
"""

from circuits.cluster.files import load_clusters, plot_clusters, save_clusters
from circuits.cluster.graph import group_graph
from circuits.cluster.mdl import (
    Clustering,
    Firing,
    MergeStep,
    cluster,
    description_length,
    firing_matrix,
    heldout_batches,
)

__all__ = [
    "Clustering",
    "Firing",
    "MergeStep",
    "cluster",
    "description_length",
    "firing_matrix",
    "group_graph",
    "heldout_batches",
    "load_clusters",
    "plot_clusters",
    "save_clusters",
]

"""`vpd cluster`: merge subcomponents into components by MDL on held-out co-firing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    clus = sub.add_parser("cluster", help="merge subcomponents into components by MDL on held-out co-firing")
    clus.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    clus.add_argument("--tokens", type=int, default=16384, help="held-out tokens to record firing on")
    clus.add_argument("--alpha", type=float, default=1.0, help="bits per unit of rank; larger keeps more apart")
    clus.add_argument("--tau", type=float, default=0.1, help="a subcomponent fires where its CI exceeds this")
    clus.add_argument("--max-merges", type=int, default=None, help="stop after this many merges")
    clus.add_argument("--across-matrices", action="store_true", help="let clusters span matrices")
    clus.add_argument(
        "--out",
        default=None,
        help="folder for clusters.json and clusters.png (default: RUN/clusters, or ./clusters for bundled)",
    )
    clus.add_argument("--json", action="store_true", help="print one JSON object")
    clus.set_defaults(handler=_cluster)


def _cluster(args: argparse.Namespace) -> None:
    from circuits.cluster import cluster, firing_matrix, heldout_batches, plot_clusters, save_clusters
    from decomposer.errors import VpdError
    from decomposer.vpd.load import load_run

    if args.tokens < 1:
        raise VpdError(f"`--tokens` must be at least 1; got {args.tokens}.")
    if not args.alpha > 0:
        raise VpdError(f"`--alpha` must be positive (bits per unit of rank); got {args.alpha}. Try 1.0.")
    if not 0 <= args.tau < 1:
        raise VpdError(f"`--tau` must be in [0, 1); got {args.tau}. The paper labels components at CI > 0.1.")
    if args.max_merges is not None and args.max_merges < 0:
        raise VpdError(f"`--max-merges` must be at least 0; got {args.max_merges}.")
    # The bundled run lives inside the installed package, so its default output goes to the working folder.
    out = Path(args.out or ("clusters" if args.run == "bundled" else Path(args.run) / "clusters"))
    d, tokenizer, _ = load_run(args.run)
    firing = firing_matrix(d, heldout_batches(d, tokenizer, args.tokens), args.tau)
    result = cluster(
        firing, alpha=args.alpha, within_matrix=not args.across_matrices, max_merges=args.max_merges, progress=True
    )
    paths = {"json": save_clusters(result, out / "clusters.json"), "png": plot_clusters(result, out / "clusters.png")}
    sizes = sorted((len(m) for m in result.clusters.values()), reverse=True)
    summary = {
        "tokens": result.n_tokens,
        "alive": len(result.keys),
        "subcomponents": firing.n_total,
        "clusters": len(sizes),
        "merges": len(result.history),
        "stopped": result.stopped,
        "cost_initial": result.cost_initial,
        "cost": result.cost,
        "largest": sizes[:5],
        "files": {k: str(v) for k, v in paths.items()},
    }
    if args.json:
        json.dump(summary, sys.stdout)
        print()
        return
    print(
        f"{summary['alive']:,} of {summary['subcomponents']:,} subcomponents fire on {summary['tokens']:,} tokens "
        f"(CI > {args.tau}); {summary['merges']:,} merges → {summary['clusters']:,} clusters ({result.stopped})"
    )
    print(f"L(P): {result.cost_initial:,.0f} → {result.cost:,.0f} bits; largest clusters {sizes[:5]}")
    print(f"clusters: {paths['json']}")

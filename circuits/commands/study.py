"""`vpd study` (many prompts × graph types → one table) and `vpd cluster` (MDL components from co-firing)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="graphs and faithfulness for every prompt of a file: CSV and PNG")
    study.add_argument("prompts", help="text file: one prompt per line, `prompt<TAB>target`, `# pair` before pairs")
    study.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    study.add_argument("--out", required=True, help="folder for study.csv and study.png")
    study.add_argument("--steps", type=int, default=2000, help="steps of each per-prompt CI optimisation")
    study.add_argument(
        "--graph-types", default="ci,adversarial,network", help="comma-separated subset of ci,adversarial,network"
    )
    study.add_argument("--json", action="store_true", help="print one JSON object")
    study.set_defaults(handler=_study)

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


def _study(args: argparse.Namespace) -> None:
    from circuits.study import parse_graph_types, read_prompts, run_study
    from decomposer.errors import VpdError
    from decomposer.vpd.distributed import torchrun_group
    from decomposer.vpd.load import load_run

    # Everything that can be checked without the model is checked before loading it.
    graph_types = parse_graph_types(args.graph_types)
    spec = read_prompts(args.prompts)
    if args.steps < 1:
        raise VpdError(f"`--steps` must be at least 1; got {args.steps}. The paper uses 2000.")
    d, tokenizer, _ = load_run(args.run)
    # Under torchrun each rank studies its share of the prompts; rank 0 writes and prints the whole table.
    with torchrun_group() as (rank, _):
        table = run_study(
            d, tokenizer, spec.prompts, targets=spec.targets, pairs=spec.pairs, graph_types=graph_types,
            optimize_steps=args.steps, out=args.out,
        )  # fmt: skip
    if rank != 0:
        return
    out = Path(args.out)
    if args.json:
        records = json.loads(table.to_json(orient="records"))
        json.dump({"csv": str(out / "study.csv"), "png": str(out / "study.png"), "rows": records}, sys.stdout)
        print()
        return
    shown = table[["prompt", "target", "graph_type", "p_target", "p_ci", "p_stochastic", "p_adversarial", "n_nodes"]]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"table: {out / 'study.csv'}\nchart: {out / 'study.png'}")


def _cluster(args: argparse.Namespace) -> None:
    from circuits.clustering import cluster, firing_matrix, heldout_batches, plot_clusters, save_clusters
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

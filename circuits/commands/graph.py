"""`vpd graph`: one prompt's attribution graph, pruned, exported and rendered."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    graph = sub.add_parser("graph", help="attribution graph of one prompt: JSON, HTML and PNG")
    graph.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    graph.add_argument("--prompt", required=True, help="the prompt text")
    graph.add_argument("--target", default=None, help="the token whose logit to explain (default: the top one)")
    graph.add_argument("--position", type=int, default=None, help="read-out position (default: the last token)")
    graph.add_argument("--out", required=True, help="folder for graph.json, graph.html, graph.png")
    graph.add_argument("--node-threshold", type=float, default=None, help="influence share of the kept nodes (0.8)")
    graph.add_argument("--edge-threshold", type=float, default=None, help="score share of the kept edges (0.98)")
    graph.add_argument(
        "--optimize",
        choices=("none", "adversarial", "ci", "stochastic"),
        default="none",
        help="re-fit CI on the prompt first (docs/attribution-graphs.md §4); `adversarial` is the faithful kind",
    )
    graph.add_argument("--steps", type=int, default=None, help="steps of the per-prompt CI optimisation (2000)")
    graph.add_argument("--l-min", type=float, default=None, help="minimality coefficient (default 0.09, ci: 1.0)")
    graph.add_argument(
        "--labels", default=None, help="JSON (key → label) or CSV (node,label) file; overrides harvest labels"
    )
    graph.add_argument(
        "--harvest",
        default=None,
        help="run or harvest folder for the explorer's hover cards (default: the run's own harvest, if any)",
    )
    graph.add_argument("--qk-top", type=int, default=None, help="q/k pairs kept per o node (5; 0: none)")
    graph.add_argument(
        "--max-nodes",
        default=None,
        help="subcomponent nodes whose edges are computed, chosen by estimated influence (7500; `none`: all)",
    )
    graph.add_argument(
        "--batch-size", type=int, default=None, help="prompt copies per forward; each backward fills several rows (16)"
    )
    graph.add_argument("--max-memory-gb", type=float, default=None, help="refuse above this estimate (default: free)")
    graph.add_argument("--save-full", action="store_true", help="also write the full graph as node-link JSON (large)")
    graph.add_argument("--json", action="store_true", help="print one JSON object")
    graph.set_defaults(handler=_graph)


def _max_nodes(text: str) -> int | str | None:
    """`--max-nodes` as given: `none` → None, digits → int; anything else is passed on for the settings to refuse."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _graph(args: argparse.Namespace) -> None:
    from attrgraph.examples import card_source
    from attrgraph.labels import labels_for_run, merge_labels, read_label_file
    from attrgraph.pipeline import attribute_prompt
    from attrgraph.settings import graph_settings
    from decomposer.errors import VpdError
    from decomposer.vpd.load import load_run
    from decomposer.vpd.report import resolve_run

    given = {
        "node_threshold": args.node_threshold,
        "edge_threshold": args.edge_threshold,
        "optimize": args.optimize,
        "steps": args.steps,
        "l_min": args.l_min,
        "qk_top": args.qk_top,
        "batch_size": args.batch_size,
        "max_memory_gb": args.max_memory_gb,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.max_nodes is not None:
        given["max_nodes"] = _max_nodes(args.max_nodes)
    settings = graph_settings(**given)
    if args.optimize != "none" and args.target is None:
        raise VpdError("`--target` is required with `--optimize`: name the token to explain, e.g. ' her'.")
    user_labels = read_label_file(args.labels) if args.labels else {}  # fail on a bad file before any work
    run_dir = resolve_run(args.run)
    harvest = card_source(run_dir, args.harvest)  # checks --harvest before any work
    d, tokenizer, _ = load_run(args.run)
    # The run's labels, then those beside a --harvest folder (e.g. its autointerp labels), then --labels.
    extra = labels_for_run(harvest) if args.harvest is not None else {}
    labels = merge_labels(labels_for_run(run_dir), extra, user_labels)
    graph = attribute_prompt(
        d,
        tokenizer,
        args.prompt,
        target=args.target,
        position=args.position,
        settings=settings,
        labels=labels,
        progress=not args.json,
    )
    paths = graph.save(args.out, full_json=args.save_full, harvest=harvest)
    summary = {**graph.summary(), "files": {k: str(v) for k, v in paths.items()}}
    if args.json:
        json.dump(summary, sys.stdout)
        print()
        return
    print(f"{args.prompt!r} → {summary['target_token']!r} at position {summary['target_pos']}")
    budget = ""
    if summary["subcomponents"] < summary["candidates"]:
        budget = f" ({summary['subcomponents']:,} of {summary['candidates']:,} alive subcomponents, by influence)"
    print(
        f"graph: {summary['nodes']:,} nodes{budget}, {summary['edges']:,} edges; pruned "
        f"(node {settings.node_threshold}, edge {settings.edge_threshold}): {summary['pruned_nodes']:,} nodes, "
        f"{summary['pruned_edges']:,} edges"
    )
    if summary["report"]:
        print("P(target): " + ", ".join(f"{k} {v:.4f}" for k, v in summary["report"].items() if isinstance(v, float)))
    print(f"HTML: {paths['html']}")

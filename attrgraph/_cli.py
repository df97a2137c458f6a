"""`vpd graph`: one prompt's attribution graph, pruned, exported and rendered."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    graph = sub.add_parser("graph", help="attribution graph of one prompt: JSON, HTML and PNG")
    graph.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    graph.add_argument("--prompt", required=True, help="the prompt text")
    graph.add_argument("--target", default=None, help="the token whose logit to explain (default: the top one)")
    graph.add_argument("--position", type=int, default=None, help="read-out position (default: the last token)")
    graph.add_argument("--out", required=True, help="folder for graph.json, graph.html, graph.png")
    graph.add_argument("--node-threshold", type=float, default=0.8, help="influence share of the kept nodes")
    graph.add_argument("--edge-threshold", type=float, default=0.98, help="score share of the kept edges")
    graph.add_argument(
        "--optimize",
        choices=("none", "adversarial", "ci", "stochastic"),
        default="none",
        help="re-fit CI on the prompt first (attribution-graphs.md §4); `adversarial` is the faithful kind",
    )
    graph.add_argument("--steps", type=int, default=2000, help="steps of the per-prompt CI optimisation")
    graph.add_argument("--l-min", type=float, default=None, help="minimality coefficient (default 0.09, ci: 1.0)")
    graph.add_argument(
        "--labels", default=None, help="JSON (key → label) or CSV (node,label) file; overrides harvest labels"
    )
    graph.add_argument("--qk-top", type=int, default=5, help="q/k pairs kept per o node (0: none)")
    graph.add_argument("--save-full", action="store_true", help="also write the unpruned graph (large)")
    graph.add_argument("--json", action="store_true", help="print one JSON object")
    graph.set_defaults(handler=_graph)


def _graph(args: argparse.Namespace) -> None:
    from attrgraph.export import save_graph_json, to_circuit_tracer
    from attrgraph.graph import build_graph
    from attrgraph.labels import labels_for_run, merge_labels, read_label_file
    from attrgraph.prune import prune_graph
    from attrgraph.qk import add_qk_pairs
    from attrgraph.render import render_html, render_png
    from decomposer.io import atomic_write_json
    from decomposer.vpd.load import load_run
    from decomposer.vpd.report import resolve_run

    user_labels = read_label_file(args.labels) if args.labels else {}  # fail on a bad file before any work
    d, tokenizer, _ = load_run(args.run)
    labels = merge_labels(labels_for_run(resolve_run(args.run)), user_labels)
    ci, report = None, None
    if args.optimize != "none":
        ci, report = _optimise(d, tokenizer, args)
    full = build_graph(
        d, tokenizer, args.prompt, target_token=args.target, target_pos=args.position, ci=ci, report=report,
        labels=labels,
    )  # fmt: skip
    pruned = prune_graph(full, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold)
    if args.qk_top > 0:
        ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        pruned = add_qk_pairs(pruned, d, ids[:, : full.graph["target_pos"] + 1], top=args.qk_top)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "graph": save_graph_json(full, out / "graph.json"),
        "pruned": save_graph_json(pruned, out / "graph.pruned.json"),
        "circuit_tracer": atomic_write_json(
            out / "graph.circuit-tracer.json",
            to_circuit_tracer(pruned, slug=out.name, node_threshold=args.node_threshold),
        ),
        "html": render_html(pruned, out / "graph.html", title=args.prompt),
        "png": render_png(pruned, out / "graph.png"),
    }
    if args.save_full:
        paths["full"] = save_graph_json(full, out / "graph.full.json")
    summary = {
        "prompt": args.prompt,
        "target_token": full.graph["target_token"],
        "target_pos": full.graph["target_pos"],
        "nodes": full.number_of_nodes(),
        "edges": full.number_of_edges(),
        "pruned_nodes": pruned.number_of_nodes(),
        "pruned_edges": pruned.number_of_edges(),
        "report": full.graph["report"],
        "files": {k: str(v) for k, v in paths.items()},
    }
    if args.json:
        json.dump(summary, sys.stdout)
        print()
        return
    print(f"{args.prompt!r} → {summary['target_token']!r} at position {summary['target_pos']}")
    print(
        f"graph: {summary['nodes']:,} nodes, {summary['edges']:,} edges; pruned "
        f"(node {args.node_threshold}, edge {args.edge_threshold}): {summary['pruned_nodes']:,} nodes, "
        f"{summary['pruned_edges']:,} edges"
    )
    if summary["report"]:
        print("P(target): " + ", ".join(f"{k} {v:.4f}" for k, v in summary["report"].items() if isinstance(v, float)))
    print(f"HTML: {paths['html']}")


def _optimise(d, tokenizer, args: argparse.Namespace):
    """Per-prompt CI for the graph's target and the faithfulness report of the result."""
    from dataclasses import asdict

    from attrgraph.graph import resolve_prompt
    from attrgraph.optimize import faithfulness, optimize_ci
    from decomposer.errors import VpdError

    if args.target is None:
        raise VpdError("`--target` is required with `--optimize`: name the token to explain, e.g. ' her'.")
    ids, pos, label, _ = resolve_prompt(d, tokenizer, args.prompt, args.target, args.position)
    l_min = args.l_min if args.l_min is not None else (1.0 if args.optimize == "ci" else 0.09)
    result = optimize_ci(
        d, ids, target_pos=pos, target_token=label, mode=args.optimize, steps=args.steps, l_min=l_min, progress=True
    )
    report = faithfulness(d, ids, result.g, target_pos=pos, target_token=label)
    return result.g, {k: float(v) if isinstance(v, float) else v for k, v in asdict(report).items()}

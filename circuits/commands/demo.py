"""`vpd demo`: the princess attribution graph on the bundled decomposition."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="the princess attribution graph on the bundled decomposition (no arguments needed)"
    )
    demo.add_argument("--out", default="vpd-demo", help="folder for the graph files (default: vpd-demo)")
    demo.add_argument(
        "--steps",
        type=int,
        default=None,
        help="per-prompt optimisation steps of both graphs (default 150 adversarial, 300 CI-only)",
    )
    demo.add_argument(
        "--harvest",
        default=None,
        help="folder whose examples/ and labels override the bundled run's, e.g. `vpd harvest --run bundled --out DIR`",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> None:
    from circuits.demo import format_summary, run_demo

    steps = {"adversarial": args.steps, "ci": args.steps} if args.steps else None
    summary = run_demo(args.out, steps=steps, harvest=args.harvest)
    print(json.dumps(summary) if args.json else format_summary(summary))

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
        help="run or harvest folder for the hover cards' examples, e.g. from `vpd harvest --run bundled --out DIR`",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> None:
    from attrgraph.harvest_format import harvest_meta_path
    from circuits.demo import format_summary, run_demo
    from decomposer.errors import VpdError

    if args.harvest is not None and harvest_meta_path(args.harvest) is None:
        raise VpdError(
            f"`--harvest` {args.harvest!r} holds no harvest.json; run `vpd harvest --run bundled --out DIR` first."
        )

    steps = {"adversarial": args.steps, "ci": args.steps} if args.steps else None
    summary = run_demo(args.out, steps=steps, harvest=args.harvest)
    print(json.dumps(summary) if args.json else format_summary(summary))

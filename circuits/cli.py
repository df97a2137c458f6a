"""The `vpd` command line. Subcommands are thin: they parse flags and call one public function.

A `VpdError` raised anywhere below is printed as one sentence and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from attrgraph import _cli as attrgraph_cli
    from circuits import commands
    from decomposer import _cli as decomposer_cli

    parser = argparse.ArgumentParser(
        prog="vpd",
        description=(
            "Decompose a language model's weights into rank-one subcomponents (VPD) and read circuits from them."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    decomposer_cli.register(sub)
    decomposer_cli.register_vpd(sub)
    attrgraph_cli.register(sub)
    for name in commands.MODULES:
        importlib.import_module(f"circuits.commands.{name}").register(sub)
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
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(handler=_demo)
    return parser


def _demo(args: argparse.Namespace) -> None:
    import json

    from circuits.demo import format_summary, run_demo

    steps = {"adversarial": args.steps, "ci": args.steps} if args.steps else None
    summary = run_demo(args.out, steps=steps)
    print(json.dumps(summary) if args.json else format_summary(summary))


def main(argv: list[str] | None = None) -> int:
    from decomposer.errors import VpdError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        # Our own bars show progress; transformers' per-file loading bars only add noise to the terminal.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        args.handler(args)
    except VpdError as err:
        print(f"vpd {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vpd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `vpd` command line: the parser assembled from `circuits/commands/` (one module per subcommand) and `main`.

Subcommands are thin: they parse flags and call one public function.

A `VpdError` raised anywhere below is printed as one sentence and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from circuits import commands

    parser = argparse.ArgumentParser(
        prog="vpd",
        description=(
            "Decompose a language model's weights into rank-one subcomponents (VPD) and read circuits from them."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in commands.MODULES:
        importlib.import_module(f"circuits.commands.{name}").register(sub)
    return parser


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

"""`vpd eval`: CE/KL per masking mode, PGD, L0 and alive counts of a decomposition."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser("eval", help="evaluate a decomposition: CE/KL per masking mode, PGD, L0, alive")
    evaluate.add_argument("--run", required=True, help="run folder, or `bundled`")
    evaluate.add_argument("--batches", type=int, default=None, help="held-out batches (default: the config's)")
    evaluate.add_argument(
        "--pgd-steps",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="PGD step counts, read from one run (default: 20, 40, 80 and the config's)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> None:
    from decomposer.vpd.report import evaluate_run, format_eval

    report = evaluate_run(args.run, n_batches=args.batches, pgd_steps=args.pgd_steps)
    if args.json:
        json.dump({k: v for k, v in report.items() if k != "mean_ci"}, sys.stdout)
        print()
    else:
        print(format_eval(report))

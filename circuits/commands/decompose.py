"""`vpd decompose`: train a VPD decomposition of a target model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    decompose = sub.add_parser("decompose", help="train a VPD decomposition of a target model")
    decompose.add_argument("--config", required=True, help="YAML config, e.g. configs/smoke.yaml")
    decompose.add_argument("--out", required=True, help="run folder")
    decompose.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    decompose.add_argument(
        "--shard",
        action="store_true",
        help="under torchrun, shard U, V, the CI network and their optimizer state across the ranks (FSDP2)",
    )
    decompose.set_defaults(handler=_decompose)


def _decompose(args: argparse.Namespace) -> None:
    from decomposer.vpd.config import load_decompose_config
    from decomposer.vpd.distributed import torchrun_group
    from decomposer.vpd.train import decompose

    config = load_decompose_config(args.config)
    # Under torchrun: one process per device, gradients averaged (or parameters sharded) across them.
    with torchrun_group(always=args.shard):
        decompose(config, args.out, resume=args.resume, progress=True, shard=args.shard)
    print(f"decomposition written to {args.out}; evaluate it with `vpd eval --run {args.out}`")

"""The `vpd` subcommands, one module each; every module has `register(subparsers)`. `MODULES` is the help order."""

MODULES = (
    "corpus",
    "train_target",
    "predict",
    "decompose",
    "evaluate",
    "graph",
    "ablate",
    "edit",
    "harvest",
    "component",
    "autointerp",
    "qk",
    "study",
    "cluster",
    "toy",
    "demo",
    "serve",
)

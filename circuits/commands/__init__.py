"""`vpd` subcommands of the circuits package; each module has `register(subparsers)`."""

MODULES = ("ablate", "edit", "harvest", "qk", "study", "toy")

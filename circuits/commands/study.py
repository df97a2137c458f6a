"""`vpd study`: many prompts × graph types → one table (CSV) and a chart."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="graphs and faithfulness for every prompt of a file: CSV and PNG")
    study.add_argument("prompts", help="text file: one prompt per line, `prompt<TAB>target`, `# pair` before pairs")
    study.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    study.add_argument("--out", required=True, help="folder for study.csv and study.png")
    study.add_argument("--steps", type=int, default=2000, help="steps of each per-prompt CI optimisation")
    study.add_argument(
        "--graph-types", default="ci,adversarial,network", help="comma-separated subset of ci,adversarial,network"
    )
    study.add_argument("--json", action="store_true", help="print one JSON object")
    study.set_defaults(handler=_study)


def _study(args: argparse.Namespace) -> None:
    from attrgraph.settings import GraphSettings
    from circuits.study import parse_graph_types, read_prompts, run_study
    from decomposer.errors import VpdError
    from decomposer.vpd.distributed import torchrun_group
    from decomposer.vpd.load import load_run

    # Everything that can be checked without the model is checked before loading it.
    graph_types = parse_graph_types(args.graph_types)
    spec = read_prompts(args.prompts)
    if args.steps < 1:
        raise VpdError(f"`--steps` must be at least 1; got {args.steps}. The paper uses 2000.")
    d, tokenizer, _ = load_run(args.run)
    # Under torchrun each rank studies its share of the prompts; rank 0 writes and prints the whole table.
    with torchrun_group() as (rank, _):
        table = run_study(
            d,
            tokenizer,
            spec.prompts,
            targets=spec.targets,
            pairs=spec.pairs,
            graph_types=graph_types,
            settings=GraphSettings(steps=args.steps),
            out=args.out,
        )
    if rank != 0:
        return
    out = Path(args.out)
    if args.json:
        records = json.loads(table.to_json(orient="records"))
        json.dump({"csv": str(out / "study.csv"), "png": str(out / "study.png"), "rows": records}, sys.stdout)
        print()
        return
    shown = table[["prompt", "target", "graph_type", "p_target", "p_ci", "p_stochastic", "p_adversarial", "n_nodes"]]
    print(shown.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"table: {out / 'study.csv'}\nchart: {out / 'study.png'}")

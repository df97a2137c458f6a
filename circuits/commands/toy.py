"""`vpd toy NAME`: train a toy target, decompose it and score the decomposition against its known mechanisms."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "toys"


def register(sub: argparse._SubParsersAction) -> None:
    toy = sub.add_parser(
        "toy", help="a toy with known mechanisms (TMS, residual MLP): train, decompose, score features recovered"
    )
    toy.add_argument("name", help="a config in configs/toys (e.g. tms_5-2, resid_mlp1) or a path to a toy YAML")
    toy.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to run (default: the config's)")
    toy.add_argument("--out", default=None, help="folder for the runs (default: runs/toys/NAME); one seed-N per seed")
    toy.add_argument("--no-plots", action="store_true", help="skip the two PNGs per seed")
    toy.add_argument("--json", action="store_true", help="print one JSON object")
    toy.set_defaults(handler=_toy)


def resolve_config(name: str) -> Path:
    """A path to a YAML, or the name of a config in `configs/toys`."""
    from decomposer.errors import VpdError

    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    for folder in (Path("configs") / "toys", CONFIG_DIR):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise VpdError(
        f"`name` {name!r} is not a toy config; use one of {', '.join(known) or 'none found'}, or a path to a YAML."
    )


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def format_result(name: str, result: dict) -> str:
    """One seed's scores as a small table."""
    lines = [
        f"{name} seed {result['seed']}: {'every feature' if result['all_recovered'] else 'NOT every feature'} recovered"
        f" (target {result['seconds']['target']:.0f} s, decompose {result['seconds']['decompose']:.0f} s)",
        f"  {'matrix':<18} {'recovered':>15} {'alive / C':>11} {'CI diag mean':>13} {'CI max off':>11}"
        f" {'MMCS':>6} {'ML2R':>6} {'on per row':>10}",
    ]
    for path, row in result["matrices"].items():
        cells = [_cell(row.get(k)) for k in ("ci_diagonal_mean", "ci_max_off_diagonal", "mmcs", "ml2r")]
        kind = "features" if row["kind"] == "features" else "rank"
        lines.append(
            f"  {path:<18} {row['recovered']:>4} / {row['pieces']:<3} {kind:<6}"
            f" {row['alive']:>4} / {row['C']:<4} {cells[0]:>13} {cells[1]:>11} {cells[2]:>6} {cells[3]:>6}"
            f" {_cell(row.get('active_per_row')):>10}"
        )
        if row["kind"] == "dense":
            lines[-1] += f"  (dense: Σ alive vs W error {row['relative_error_alive_sum']:.3f})"
    mse, zero = result["mse_ci"], result["mse_zero"]
    lines.append(f"  MSE of the CI-masked model vs target {mse:.3g} (all masks 0: {zero:.3g})")
    return "\n".join(lines)


def _toy(args: argparse.Namespace) -> None:
    from decomposer.errors import VpdError
    from decomposer.vpd.toy_run import load_toy_config, run_toy

    path = resolve_config(args.name)
    config = load_toy_config(path)
    seeds = args.seeds if args.seeds is not None else list(config.seeds)
    if any(s < 0 for s in seeds):
        raise VpdError(f"`--seeds` must be non-negative integers; got {seeds}.")
    out = Path(args.out) if args.out else Path("runs") / "toys" / path.stem
    results = []
    for seed in seeds:
        result = run_toy(config, out / f"seed-{seed}", seed, progress=not args.json, plots=not args.no_plots)
        results.append(result)
        if not args.json:
            print(format_result(path.stem, result), flush=True)
    summary = {
        "toy": path.stem,
        "config": str(path),
        "seeds": seeds,
        "all_recovered": sum(r["all_recovered"] for r in results),
        "results": results,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{path.stem}: {summary['all_recovered']} of {len(seeds)} seeds recovered every piece; runs in {out}")

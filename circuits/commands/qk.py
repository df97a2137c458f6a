"""`vpd qk`: find the previous-token q/k pair of a run and check it by ablating the query subcomponent."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FORMAT = "qk_analysis"
FORMAT_VERSION = 1
ABLATION_SAMPLES = 256  # windows used for the ablation, as in the paper's figure
MIN_DENSITY = 0.95


def register(sub: argparse._SubParsersAction) -> None:
    qk = sub.add_parser(
        "qk", help="query/key analysis: the previous-token pair, densities, and a q ablation (PNG + JSON)"
    )
    qk.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    qk.add_argument("--layer", type=int, default=None, help="block to search (default: every block)")
    qk.add_argument("--tokens", type=int, default=16_384, help="held-out tokens for densities and signs")
    qk.add_argument("--max-offset", type=int, default=16, help="largest offset τ of the static strength")
    qk.add_argument("--out", default=None, help="folder for qk.json and the PNGs (default: RUN/qk)")
    qk.add_argument("--json", action="store_true", help="print one JSON object")
    qk.set_defaults(handler=_qk)


def _default_out(run: str) -> Path:
    # The bundled run lives inside the installed package, which may be read-only.
    return Path("qk-bundled") if run == "bundled" else Path(run) / "qk"


def _qk(args: argparse.Namespace) -> None:
    import torch

    from attrgraph.nodes import ComponentKey
    from circuits import qk
    from decomposer.errors import VpdError
    from decomposer.io import atomic_write_json
    from decomposer.vpd import batches as vpd_batches
    from decomposer.vpd import load as vpd_load

    if args.tokens < 1:
        raise VpdError(f"`--tokens` must be at least 1; got {args.tokens}.")
    if args.max_offset < 2:
        raise VpdError(f"`--max-offset` must be at least 2 so that τ = 1 has neighbours; got {args.max_offset}.")
    d, tokenizer, _ = vpd_load.load_run(args.run)
    layers = qk.qk_layers(d)
    if args.layer is not None and args.layer not in layers:
        shown = ", ".join(map(str, layers)) or "none"
        raise VpdError(
            f"`--layer` {args.layer} is not a block with decomposed q and k projections; use one of {shown}."
        )
    cfg = d.config
    windows = vpd_batches.run_heldout_windows(cfg, tokenizer, target=d.model.target, n_tokens=args.tokens)
    batches = list(torch.split(windows, cfg.optim.batch_size))

    stats = qk.firing_stats(d, batches, progress=not args.json)
    pair = qk.find_previous_token_pair(
        d, batches, args.layer, min_density=MIN_DENSITY, max_offset=args.max_offset, stats=stats
    )
    effect = qk.ablation_attention_effect(d, windows[:ABLATION_SAMPLES], pair.q_key)
    st = pair.strength
    on = qk.near_always_on(stats, [st.q_path, st.k_path], MIN_DENSITY)

    out = Path(args.out) if args.out else _default_out(args.run)
    files = {
        "static_strength": qk.plot_static_strength(st, pair.q_index, pair.k_index, out / "static_strength.png"),
        "attention_ablation": qk.plot_attention_ablation(effect, out / "attention_ablation.png"),
        "offset_attention": qk.plot_offset_attention(effect, out / "offset_attention.png"),
    }
    summary = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run": str(args.run),
        "tokens": stats.tokens,
        "min_density": MIN_DENSITY,
        "max_offset": args.max_offset,
        "pair": pair.to_dict(),
        "near_always_on": {ComponentKey.of(p, 0).matrix: cs for p, cs in on.items()},
        "densest": {ComponentKey.of(p, 0).matrix: qk.top_densities(stats, p) for p in (st.q_path, st.k_path)},
        "ablation": effect.to_dict(),
        "attention_at_offset_1": {
            "before": effect.mean_before[:, 1].tolist(),
            "after": effect.mean_after[:, 1].tolist(),
        },
        "files": {**{k: str(v) for k, v in files.items()}, "json": str(out / "qk.json")},
    }
    atomic_write_json(out / "qk.json", summary)
    if args.json:
        json.dump(summary, sys.stdout)
        print()
        return
    _print(summary)


def _print(summary: dict) -> None:
    """The summary as text: the pair, densities, and the attention at τ = 1 before and after the ablation."""
    p = summary["pair"]
    peak = ", ".join(map(str, p["peak_heads"])) or "none"
    note = "" if p["near_always_on"] else f" (no subcomponent reaches {summary['min_density']:.0%}: densest used)"
    print(f"layer {p['layer']}: previous-token pair {p['q']} × {p['k']}{note}")
    print(f"  static strength margin at τ=1: {p['margin']:.2f} z in head {p['head']}; peaks at τ=1 in heads {peak}")
    print(f"densities over {summary['tokens']:,} held-out tokens:")
    print(f"  {p['q']} {p['q_density']:.1%}, {p['k']} {p['k_density']:.1%}")
    for matrix, cs in summary["near_always_on"].items():
        dense = ", ".join(f"{c}:{v:.1%}" for c, v in summary["densest"][matrix])
        print(f"  {matrix}: {len(cs)} at ≥ {summary['min_density']:.0%}; densest {dense}")
    print(f"ablating {p['q']} on {summary['ablation']['samples']} windows: mean attention at τ=1")
    print(f"  {'head':<6}{'before':>8}{'after':>8}")
    at1 = summary["attention_at_offset_1"]
    for h, (b, a) in enumerate(zip(at1["before"], at1["after"], strict=True)):
        print(f"  {h:<6}{b:>8.3f}{a:>8.3f}")
    print(f"PNG and JSON: {Path(summary['files']['json']).parent}")

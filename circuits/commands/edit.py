"""`vpd edit`: rewrite one subcomponent's write vector toward a token's unembedding, save the model, report metrics.

The output folder is written in one atomic step: the edited model and tokenizer (`save_pretrained`), `edit.json`
with the metrics, and with `--lora` the Pareto figure `pareto.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

FORMAT = "model_edit"
FORMAT_VERSION = 1
REPORT_FILE = "edit.json"
PARETO_FILE = "pareto.png"
DEFAULT_SWEEP = "0,1,2,3,5"


def register(sub: argparse._SubParsersAction) -> None:
    edit = sub.add_parser(
        "edit",
        help="edit one subcomponent's write vector toward a token (docs/attribution-graphs.md §11); save the model",
    )
    edit.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    edit.add_argument("--component", required=True, help="the subcomponent, e.g. 2.mlp.down:17 (an o or down matrix)")
    edit.add_argument("--token", required=True, help="the token o whose unembedding direction is written, e.g. 'o'")
    edit.add_argument("--alpha", default="3", help="write scale α (default 3)")
    edit.add_argument("--out", required=True, help="folder for the edited model, edit.json and pareto.png")
    edit.add_argument("--overwrite", action="store_true", help="replace an --out folder that already holds a model")
    edit.add_argument("--sweep", default=None, help=f"comma-separated α values to measure too, e.g. {DEFAULT_SWEEP}")
    edit.add_argument("--lora", action="store_true", help="train the LoRA baseline and draw the Pareto figure")
    # Defaults (None here) are LoraSweep's: the paper's grid.
    edit.add_argument("--lora-ns", default=None, help="training-window counts n (capped at the firings found)")
    edit.add_argument("--lora-lambdas", default=None, help="KL weights λ")
    edit.add_argument("--lora-ranks", default=None, help="LoRA ranks")
    edit.add_argument("--lora-steps", default=None, help="AdamW steps per LoRA")
    edit.add_argument(
        "--lora-tokens", default="100000", help="held-out tokens (after the evaluation ones) to cut windows from"
    )
    edit.add_argument("--tokens", default="4096", help="held-out tokens to measure on")
    edit.add_argument("--threshold", default="0.1", help="firing threshold τ on the CI")
    edit.add_argument("--window", default="20", help="half-width of the surrounding windows")
    edit.add_argument("--json", action="store_true", help="print one JSON object")
    edit.set_defaults(handler=_edit)


def _number(flag: str, text: str, *, integer: bool = False, minimum: float | None = None) -> float | int:
    """A flag's value as a finite number (argparse would print usage lines; we report one sentence)."""
    from decomposer.errors import VpdError

    kind = "an integer" if integer else "a number"
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise VpdError(f"`{flag}` {text!r} is not {kind}; pass e.g. {flag} {'10' if integer else '3'}.") from None
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise VpdError(
            f"`{flag}` must be {kind} ≥ {minimum:g}; got {text!r}."
            if minimum is not None
            else f"`{flag}` must be a finite number; got {text!r}."
        )
    return value


def _numbers(flag: str, text: str, *, integer: bool = False, minimum: float | None = None) -> list:
    from decomposer.errors import VpdError

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise VpdError(f"`{flag}` is empty; pass comma-separated values such as {DEFAULT_SWEEP}.")
    return [_number(flag, p, integer=integer, minimum=minimum) for p in parts]


def _check_out(out: Path, overwrite: bool) -> None:
    from decomposer.errors import VpdError

    if out.exists() and not out.is_dir():
        raise VpdError(f"`--out` '{out}' is a file; pass a folder for the edited model.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "config.json").exists() or any(out.glob("*.safetensors")):
        if not overwrite:
            raise VpdError(
                f"`--out` '{out}' already holds a model; pass --overwrite to replace it, or choose a new folder."
            )
    else:  # the folder is replaced as a whole, so never swap away files that are not ours
        raise VpdError(f"`--out` '{out}' is a non-empty folder without a model; choose an empty or new folder.")


def _metrics_dict(metrics) -> dict:
    # JSON has no NaN; a mean over no position is null.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(metrics).items()}


def _edit(args: argparse.Namespace) -> None:
    """`vpd edit`: check the flags, edit, sweep, write the model and print; one straight-line command handler."""
    from circuits.edit import LoraSweep, edit_study, heldout_windows, resolve_edit
    from decomposer.io import atomic_write_dir, atomic_write_json
    from decomposer.vpd.load import load_run

    # Every flag is checked before the run is loaded, so a typo costs nothing.
    alpha = _number("--alpha", args.alpha)
    sweep = []
    if args.sweep is not None or args.lora:  # the Pareto figure needs an α sweep; default to the paper-like one
        sweep = _numbers("--sweep", args.sweep if args.sweep is not None else DEFAULT_SWEEP)
    threshold = _number("--threshold", args.threshold, minimum=0)
    window = _number("--window", args.window, integer=True, minimum=0)
    tokens = _number("--tokens", args.tokens, integer=True, minimum=1)
    lora = None
    if args.lora:
        given: dict = {}
        if args.lora_ns is not None:
            given["ns"] = _numbers("--lora-ns", args.lora_ns, integer=True, minimum=1)
        if args.lora_lambdas is not None:
            given["lambdas"] = _numbers("--lora-lambdas", args.lora_lambdas, minimum=0)
        if args.lora_ranks is not None:
            given["ranks"] = _numbers("--lora-ranks", args.lora_ranks, integer=True, minimum=1)
        if args.lora_steps is not None:
            given["steps"] = _number("--lora-steps", args.lora_steps, integer=True, minimum=1)
        lora = LoraSweep(**given)
        lora_tokens = _number("--lora-tokens", args.lora_tokens, integer=True, minimum=1)
    out = Path(args.out)
    _check_out(out, args.overwrite)

    d, tokenizer, _ = load_run(args.run)
    resolve_edit(d, tokenizer, args.component, args.token)  # fail before the held-out text is tokenized
    eval_ids, lora_ids = heldout_windows(d, tokenizer, eval_tokens=tokens, lora_tokens=lora_tokens if lora else 0)
    study = edit_study(
        d,
        tokenizer,
        args.component,
        args.token,
        alpha=alpha,
        eval_ids=eval_ids,
        sweep=sweep,
        threshold=threshold,
        window=window,
        lora_ids=lora_ids,
        lora=lora,
        progress=not args.json,
    )
    files = [str(out / REPORT_FILE)] + ([str(out / PARETO_FILE)] if lora else [])
    report = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run": str(args.run),
        "component": study.key,
        "module": study.module,
        "index": study.index,
        "token": study.token,
        "token_id": study.token_id,
        "alpha": study.alpha,
        "sign": study.sign,
        "mean_activation": study.mean_activation,
        "settings": study.settings,
        "metrics": _metrics_dict(study.metrics),
        "sweep": [{"alpha": p.alpha, **_metrics_dict(p.metrics)} for p in study.sweep],
        "lora": [
            {
                "rank": p.rank,
                "n": p.n,
                "n_windows": p.n_windows,
                "lam": p.lam,
                "final_loss": p.final_loss,
                **_metrics_dict(p.metrics),
            }
            for p in study.lora
        ],
        "lora_settings": dict(lora or {}),
        "out": str(out),
        "files": files,
    }

    def fill(tmp: Path) -> None:
        study.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / REPORT_FILE, report)
        if lora:
            from circuits.edit import pareto_plot

            pareto_plot(study.sweep, study.lora, tmp / PARETO_FILE)

    atomic_write_dir(out, fill)
    if args.json:
        json.dump(report, sys.stdout)
        print()
        return
    _print(report)


def _print(r: dict) -> None:
    m, s = r["metrics"], r["settings"]

    def kl(v):
        return "-" if v is None else f"{v:.4g}"

    print(
        f"edit {r['component']} → {r['token']!r} (id {r['token_id']}), α {r['alpha']:g}, σ {r['sign']:+d} "
        f"(mean a_c {r['mean_activation']:+.4g} on firing tokens)"
    )
    print(
        f"held-out: {s['eval_tokens']:,} tokens; {m['n_firing']:,} firing (CI > {s['threshold']:g}), "
        f"{m['n_surrounding']:,} surrounding (±{s['window']}), {m['n_global']:,} non-firing"
    )
    print(f"P(o) at firing positions: target {m['efficacy_target']:.4g} → edited {m['efficacy']:.4g}")
    print(f"D_KL,Surrounding {kl(m['kl_surrounding'])}   D_KL,Global {kl(m['kl_global'])}")
    if r["sweep"]:
        print(f"{'α':>8}{'P(o)':>10}{'KL sur':>11}{'KL glob':>11}")
        for p in r["sweep"]:
            print(f"{p['alpha']:>8g}{p['efficacy']:>10.4f}{kl(p['kl_surrounding']):>11}{kl(p['kl_global']):>11}")
    if r["lora"]:
        print(f"{'LoRA r':>7}{'n':>6}{'λ':>8}{'P(o)':>10}{'KL sur':>11}{'KL glob':>11}")
        for p in r["lora"]:
            print(
                f"{p['rank']:>7}{p['n_windows']:>6}{p['lam']:>8g}{p['efficacy']:>10.4f}"
                f"{kl(p['kl_surrounding']):>11}{kl(p['kl_global']):>11}"
            )
    print(f"saved the edited model to {r['out']}" + (f"; Pareto figure {r['files'][-1]}" if r["lora"] else ""))

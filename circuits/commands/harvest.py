"""`vpd harvest`: component statistics over held-out text, saved under the run as `harvest/` and `examples/`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    harvest = sub.add_parser("harvest", help="component statistics over held-out text: rates, tokens, examples")
    harvest.add_argument("--run", required=True, help="decomposition run folder, or `bundled`")
    harvest.add_argument(
        "--tokens", type=int, default=65_536, help="held-out tokens, rounded up to whole windows (default 65,536)"
    )
    harvest.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's)")
    harvest.add_argument("--tau", type=float, default=0.1, help="a subcomponent fires where CI > tau (default 0.1)")
    harvest.add_argument("--out", default=None, help="folder that receives harvest/ (default: the run folder)")
    harvest.add_argument("--json", action="store_true", help="print one JSON object")
    harvest.set_defaults(handler=_harvest)


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def _harvest(args: argparse.Namespace) -> None:
    import torch

    from circuits.harvest import examples_from_harvest, harvest, save_harvest
    from decomposer.errors import VpdError
    from decomposer.vpd.batches import run_heldout_windows
    from decomposer.vpd.distributed import torchrun_group
    from decomposer.vpd.load import load_run
    from decomposer.vpd.report import resolve_run
    from decomposer.vpd.run import read_metadata

    if args.tokens < 1:
        raise VpdError(f"`--tokens` must be at least 1; got {args.tokens}.")
    if args.batch_size is not None and args.batch_size < 1:
        raise VpdError(f"`--batch-size` must be at least 1; got {args.batch_size}.")
    if not 0 <= args.tau < 1:
        raise VpdError(f"`--tau` must be in [0, 1); got {args.tau}. Pass a CI threshold such as 0.1.")
    run_dir = resolve_run(args.run)
    read_metadata(run_dir)  # a missing run is reported as such, not as a read-only folder
    out = Path(args.out) if args.out is not None else run_dir
    if args.out is None and (str(args.run) == "bundled" or not _writable(run_dir)):
        # The bundled run lives inside the package; a harvest (hundreds of MB) never goes there.
        raise VpdError(
            f"`--out` is required because the run folder {run_dir} is read-only or the bundled run; pass `--out DIR`."
        )
    # Under torchrun (which also picks each rank's GPU) the ranks share the forwards, and rank 0 holds the
    # counts, writes and reports them.
    with torchrun_group() as (rank, _):
        d, tokenizer, _ = load_run(args.run)
        if torch.cuda.is_available():  # the pass runs where the decomposition lives
            d.model.to("cuda")
            d.ci_fn.to("cuda")
        cfg = d.config
        batch_size = args.batch_size or cfg.optim.batch_size
        windows = run_heldout_windows(cfg, tokenizer, target=d.model.target, n_tokens=args.tokens)
        seq_len, batches = windows.shape[1], list(windows.split(batch_size))
        h = harvest(d, batches, tokenizer=tokenizer, tau_fire=args.tau, progress=True)
    if rank != 0:
        return
    try:
        folder = save_harvest(h, out, progress=True)
        command = f"vpd harvest --run {args.run} --tokens {args.tokens} --tau {args.tau}"
        made = {"run": str(args.run), "command": command}
        ex = examples_from_harvest(h, d, made=made)
        examples = ex.save(out)
    except OSError as err:
        raise VpdError(
            f"Could not write the harvest into `--out` {str(out)!r} ({err.strerror}); pass a writable folder."
        ) from None
    densest = sorted(h.alive.tolist(), key=lambda flat: -float(h.density[flat]))[:10]
    summary = {
        "tokens": h.n_tokens,
        "sequences": len(h.seq_starts) - 1,
        "seconds": h.seconds,
        "tokens_per_s": h.tokens_per_s,
        "device": str(d.model_device),
        "tau_fire": h.tau_fire,
        "alive": len(h.alive),
        "C_total": h.C_total,
        "densest": [{"key": h.key(f), "density": float(h.density[f]), "mean_ci": float(h.mean_ci[f])} for f in densest],
        "folder": str(folder),
        "examples": str(examples),
    }
    if args.json:
        json.dump(summary, sys.stdout)
        print()
        return
    print(
        f"harvested {h.n_tokens:,} tokens ({summary['sequences']:,} sequences of {seq_len}) in {h.seconds:.1f} s: "
        f"{h.tokens_per_s:,.0f} tokens/s on {summary['device']}"
    )
    if h.n_tokens < args.tokens:
        print(f"(the held-out text gave {h.n_tokens:,} tokens, fewer than the {args.tokens:,} asked for)")
    print(f"alive at CI > {h.tau_fire}: {len(h.alive):,} of {h.C_total:,} subcomponents")
    print("densest subcomponents:")
    for row in summary["densest"]:
        label = ex.labels.get(row["key"], "")
        print(f"  {row['key']:<18} density {row['density']:.4f}  mean CI {row['mean_ci']:.4f}  {label}")
    print(f"wrote {folder} and {examples} (what the explorer, `vpd graph` and `vpd autointerp` read)")

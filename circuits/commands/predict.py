"""`vpd predict`: a model's top next-token predictions for a prompt."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    predict = sub.add_parser("predict", help="print a model's top next-token predictions for a prompt")
    predict.add_argument("prompt", help="the prompt text")
    predict.add_argument(
        "--model",
        default="bundled",
        help="`bundled`, `smollm2-135m` (fetched and converted once), a local model folder, or a hub id",
    )
    predict.add_argument("-k", "--top-k", type=int, default=5, help="how many predictions to print")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    predict.set_defaults(handler=_predict)


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

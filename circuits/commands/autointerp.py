"""`vpd autointerp`: label subcomponents from their examples through an OpenAI-compatible chat-completions endpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

_ENDPOINT_ENV, _MODEL_ENV, _KEY_ENV = "VPD_LLM_BASE_URL", "VPD_LLM_MODEL", "OPENAI_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "autointerp",
        help="label subcomponents from their examples with an LLM (any OpenAI-compatible endpoint)",
        description=(
            "Ask an LLM behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, a llama.cpp "
            "server) for a short label of each subcomponent, from its activating contexts and token statistics. "
            "Labels go to <out>/autointerp/labels.json, which `vpd graph` and the explorer read as LLM labels; "
            "finished requests are cached in <out>/autointerp/cache.jsonl, so a rerun resumes."
        ),
    )
    p.add_argument("--run", required=True, help="run folder, a `vpd harvest --out` folder, or `bundled`")
    p.add_argument("--harvest", default=None, help="folder holding examples/ (default: the run folder)")
    p.add_argument(
        "--endpoint",
        default=None,
        help=f"API base before /chat/completions, e.g. http://localhost:8000/v1 (default: ${_ENDPOINT_ENV})",
    )
    p.add_argument("--model", default=None, help=f"model name the endpoint serves (default: ${_MODEL_ENV})")
    p.add_argument(
        "--api-key-env",
        default=None,
        metavar="NAME",
        help=f"environment variable holding the API key (default: {_KEY_ENV}; unset sends no key, as local servers "
        "expect)",
    )
    p.add_argument("--limit", type=int, default=None, help="label at most N subcomponents, most firings first")
    p.add_argument("--keys", nargs="+", default=None, metavar="KEY", help="label these component keys, in order")
    p.add_argument(
        "--out",
        default=None,
        help="folder that receives autointerp/ (default: the examples' folder; required for `bundled`)",
    )
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one reply (default 60)")
    p.add_argument("--retries", type=int, default=5, help="retries on 429, 5xx and timeouts (default 5)")
    p.add_argument("--max-tokens", type=int, default=64, help="reply length limit in tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    p.add_argument("--contexts", type=int, default=30, help="activating contexts shown per subcomponent (default 30)")
    p.add_argument("--template", default=None, help="prompt template file (default: the packaged prompt-v1.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_autointerp)


def _examples(args: argparse.Namespace, run_dir: Path):
    from attrgraph.examples import examples_path, load_examples
    from decomposer.errors import VpdError

    where = Path(args.harvest) if args.harvest is not None else run_dir
    if not where.exists():
        flag = "--harvest" if args.harvest is not None else "--run"
        raise VpdError(
            f"`{flag}` {str(where)!r} does not exist; pass a run folder, a `vpd harvest --out` folder or `bundled`."
        )
    if examples_path(where) is None:
        if args.harvest is not None:
            raise VpdError(
                f"`--harvest` {args.harvest!r} holds no examples/ folder; run `vpd harvest --run {args.run} --out "
                f"{args.harvest}` first, or pass the folder you gave `vpd harvest --out`."
            )
        raise VpdError(
            f"The run {args.run!r} has no harvest (no examples/ folder) to label from; run `vpd harvest --run "
            f"{args.run} --out DIR` and pass `--harvest DIR`."
        )
    return load_examples(where, arg="--harvest" if args.harvest is not None else "--run"), where


def _autointerp(args: argparse.Namespace) -> None:
    from circuits.autointerp import ChatClient, label_subcomponents, load_template
    from decomposer.errors import VpdError
    from decomposer.vpd.report import resolve_run

    endpoint = args.endpoint or os.environ.get(_ENDPOINT_ENV, "").strip()
    if not endpoint:
        raise VpdError(
            "`--endpoint` is required: the base URL of an OpenAI-compatible API, such as http://localhost:8000/v1 "
            f"(vLLM), http://localhost:11434/v1 (Ollama) or https://api.openai.com/v1 (or set ${_ENDPOINT_ENV})."
        )
    model = args.model or os.environ.get(_MODEL_ENV, "").strip()
    if not model:
        raise VpdError(f"`--model` is required: the model name the endpoint serves (or set ${_MODEL_ENV}).")
    for flag, value, low in (
        ("--limit", args.limit, 1),
        ("--concurrency", args.concurrency, 1),
        ("--retries", args.retries, 0),
        ("--max-tokens", args.max_tokens, 1),
        ("--contexts", args.contexts, 1),
    ):
        if value is not None and value < low:
            raise VpdError(f"`{flag}` must be at least {low}; got {value}.")
    if not args.timeout > 0:
        raise VpdError(f"`--timeout` must be a positive number of seconds; got {args.timeout}.")
    key_env = args.api_key_env or _KEY_ENV
    api_key = os.environ.get(key_env, "").strip() or None
    if args.api_key_env and api_key is None:
        raise VpdError(f"`--api-key-env` names {key_env}, which is not set; export it or leave the flag out.")
    template = load_template(args.template)

    run_dir = resolve_run(args.run)
    examples, where = _examples(args, run_dir)
    out = Path(args.out) if args.out is not None else where
    if args.out is None and ((str(args.run) == "bundled" and args.harvest is None) or not os.access(where, os.W_OK)):
        raise VpdError(f"`--out` is required because {str(where)!r} is read-only or the bundled run; pass `--out DIR`.")
    client = ChatClient(
        endpoint,
        model,
        api_key=api_key,
        key_hint=f"${key_env}",
        timeout=args.timeout,
        retries=args.retries,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    try:
        result = label_subcomponents(
            examples,
            out,
            client,
            template=template,
            keys=args.keys,
            limit=args.limit,
            max_contexts=args.contexts,
            concurrency=args.concurrency,
            progress=not args.json,
        )
    except OSError as err:  # the client turns its own errors into one sentence; this is the folder
        raise VpdError(
            f"Could not write into `--out` {str(out)!r} ({err.strerror or err}); pass a writable folder."
        ) from None
    summary = {"model": model, "endpoint": client.endpoint, "template_version": template.version, **result.summary()}
    if args.json:
        json.dump(summary, sys.stdout)
        print()
        return
    kinds = Counter(reason.split(":")[0].split(",")[0] for reason in result.failed.values())
    failed = f"{len(result.failed)} failed" + (
        " (" + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) + ")" if kinds else ""
    )
    print(
        f"{result.selected:,} subcomponents: {result.labelled:,} labelled by {model}, {result.cached:,} from the "
        f"cache, {result.unclear:,} unclear, {failed}; {result.requests:,} requests ({result.retries:,} retries)"
    )
    for key, reason in list(result.failed.items())[:3]:
        print(f"  {key}: {reason}")
    if result.failed:
        print("  (a rerun retries the failed ones and skips the rest)")
    print(f"wrote {result.total_labels:,} labels to {result.labels_file}")
    print(f"show them: vpd graph --run {args.run} --labels {result.labels_file} ...")

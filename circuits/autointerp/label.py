"""A labelling run: subcomponents in order of usefulness, a bounded number of requests in flight, a cache to resume.

`label_subcomponents` asks the endpoint for the label of each subcomponent not already in the cache, at most
`concurrency` requests at a time, appending each finished one to `<out>/autointerp/cache.jsonl`, and writes every
label of this template and model to `<out>/autointerp/labels.json` (also when the run is interrupted), the file
`attrgraph.labels.labels_for_run` and `vpd graph --labels` read as source `llm`.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attrgraph.examples import ComponentExamples
from attrgraph.labels import AUTOINTERP_LABELS, LABELS_FORMAT, LABELS_FORMAT_VERSION
from circuits.autointerp.cache import LabelCache
from circuits.autointerp.client import ChatClient, RequestFailed, public_endpoint
from circuits.autointerp.prompt import PromptTemplate, ReplyRejected, load_template, parse_label, render_messages
from decomposer.errors import VpdError
from decomposer.io import atomic_write_json

CACHE_FILE = "cache.jsonl"


@dataclass
class AutointerpResult:
    """What one run did. `labelled`, `unclear` and `failed` count this run's requests; `cached` the ones it skipped."""

    labels_file: Path | None
    cache_file: Path
    selected: int
    labelled: int = 0
    cached: int = 0
    unclear: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    requests: int = 0
    total_labels: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "labelled": self.labelled,
            "cached": self.cached,
            "unclear": self.unclear,
            "failed": len(self.failed),
            "failures": self.failed,
            "requests": self.requests,
            "retries": self.retries,
            "labels": self.total_labels,
            "labels_file": str(self.labels_file) if self.labels_file else None,
            "cache_file": str(self.cache_file),
        }


def select_keys(examples: ComponentExamples, keys: list[str] | None = None, limit: int | None = None) -> list[str]:
    """The subcomponents to label, most useful first: `keys` as given, else every alive one by firing count.

    Raises:
        VpdError: A key that is not an alive subcomponent of the examples.
    """
    if keys:
        unknown = [k for k in keys if k not in examples]
        if unknown:
            raise VpdError(
                f"`--keys` {', '.join(unknown[:3])}{' …' if len(unknown) > 3 else ''} "
                f"{'is' if len(unknown) == 1 else 'are'} not among the {len(examples):,} alive subcomponents of the "
                "examples; pass component keys such as "
                f"{examples.keys[0] if len(examples) else '1.attn.q:31'}."
            )
        order = list(dict.fromkeys(keys))
    else:
        counts = examples.tensors["firing_count"].tolist()
        order = [examples.keys[i] for i in sorted(range(len(examples)), key=lambda i: (-counts[i], i))]
    return order[:limit] if limit is not None else order


def autointerp_dir(out: str | Path) -> Path:
    return Path(out).joinpath(*AUTOINTERP_LABELS[:-1])


def write_labels(path: Path, labels: dict[str, str], *, client: ChatClient, template: PromptTemplate) -> Path:
    """The versioned labels file (`attrgraph.labels`'s `vpd-labels` format), written atomically."""
    return atomic_write_json(
        path,
        {
            "format": LABELS_FORMAT,
            "format_version": LABELS_FORMAT_VERSION,
            "source": "llm",
            "model": client.model,
            "endpoint": public_endpoint(client.endpoint),
            "template_version": template.version,
            "labels": dict(sorted(labels.items())),
        },
    )


def label_subcomponents(
    examples: ComponentExamples,
    out: str | Path,
    client: ChatClient,
    *,
    template: PromptTemplate | None = None,
    keys: list[str] | None = None,
    limit: int | None = None,
    concurrency: int = 4,
    max_contexts: int = 30,
    progress: bool = False,
) -> AutointerpResult:
    """Label subcomponents through `client`, resuming from the cache in `<out>/autointerp/`.

    Args:
        examples: The run's examples artifact (`attrgraph.examples.load_examples`).
        out: The folder that receives `autointerp/labels.json` and `autointerp/cache.jsonl`.
        client: The endpoint and model.
        template: The prompt (default: the packaged one).
        keys: Which subcomponents, in this order (default: every alive one, by firing count).
        limit: At most this many of them (cached ones included).
        concurrency: Requests in flight at once.
        max_contexts: Activating contexts shown per subcomponent (the paper used up to 30).

    Raises:
        EndpointError: The endpoint is unreachable or rejects the configuration; the labels so far are written.
        VpdError: A bad key or count.
    """
    from tqdm.auto import tqdm

    if concurrency < 1:
        raise VpdError(f"`--concurrency` must be at least 1; got {concurrency}.")
    if limit is not None and limit < 1:
        raise VpdError(f"`--limit` must be at least 1; got {limit}.")
    template = template or load_template()
    folder = autointerp_dir(out)
    folder.mkdir(parents=True, exist_ok=True)  # an unwritable `out` fails here, before any request
    cache = LabelCache(folder / CACHE_FILE)
    tag = {"template_version": template.version, "template_sha": template.sha, "model": client.model}
    order = select_keys(examples, keys, limit)
    pending = [k for k in order if cache.finished(k, *tag.values()) is None]
    result = AutointerpResult(
        labels_file=None, cache_file=cache.path, selected=len(order), cached=len(order) - len(pending)
    )
    client.stop.clear()  # a client stopped by an earlier, interrupted run may label again

    def ask(messages: list[dict]) -> tuple[str, str]:
        reply = client.complete(messages)
        raw = reply.content if isinstance(reply.content, str) else ""
        return parse_label(reply.content, finish_reason=reply.finish_reason, refusal=reply.refusal), raw

    # Daemon workers, so that an interrupted run exits at once instead of waiting out the requests in flight.
    jobs: queue.Queue = queue.Queue()
    replies: queue.Queue = queue.Queue()

    def work() -> None:
        while (job := jobs.get()) is not None:
            key, messages = job
            try:
                replies.put((key, ask(messages), None))
            except BaseException as err:  # handed to the main thread, which decides
                replies.put((key, None, err))

    workers = [threading.Thread(target=work, name=f"autointerp-{i}", daemon=True) for i in range(concurrency)]
    for worker in workers:
        worker.start()
    bar = None  # shown from the first reply on, so that an unreachable endpoint prints its sentence alone
    todo = iter(pending)
    inflight = 0
    completed = False
    try:
        while True:
            # Never more than `concurrency` handed out, so nothing waits in a queue when the run stops.
            while inflight < concurrency and (key := next(todo, None)) is not None:
                card = examples.card(key, n_contexts=max_contexts, list_size=8)
                assert card is not None, f"{key} was selected from the examples"
                jobs.put((key, render_messages(template, card, max_contexts=max_contexts)))
                inflight += 1
            if not inflight:
                break
            key, answer, error = replies.get()
            inflight -= 1
            if isinstance(error, ReplyRejected) and error.kind == "unclear":
                cache.append({"key": key, **tag, "unclear": True, "reply": error.reason})
                result.unclear += 1
            elif isinstance(error, ReplyRejected | RequestFailed):
                cache.append({"key": key, **tag, "error": error.reason})
                result.failed[key] = error.reason
            elif error is not None:
                raise error
            else:
                label, raw = answer
                cache.append({"key": key, **tag, "label": label, "reply": raw[:500]})
                result.labelled += 1
            if bar is None:
                bar = tqdm(
                    total=len(order), initial=result.cached, desc="autointerp", unit="label", disable=not progress
                )
            bar.update(1)
            if result.failed:
                bar.set_postfix(failed=len(result.failed), refresh=False)
        completed = True
    finally:
        if not completed:
            client.stop.set()  # retry waits end now; a request in flight ends with its reply or timeout
        for _ in workers:
            jobs.put(None)
        if completed:
            for worker in workers:
                worker.join()
        if bar is not None:
            bar.close()
        cache.close()
        result.requests, result.retries = client.n_requests, client.n_retries
        labels = {k: v for k, v in cache.labels(*tag.values()).items() if k in examples}
        result.total_labels = len(labels)
        if labels or completed:
            result.labels_file = write_labels(folder / AUTOINTERP_LABELS[-1], labels, client=client, template=template)
    return result


__all__ = ["AutointerpResult", "autointerp_dir", "label_subcomponents", "select_keys", "write_labels"]

"""The server's one loaded run: graphs and interventions on it, one at a time, with progress and limits.

A `Session` owns the decomposition, its tokenizer, labels and examples, and a lock: the model's hooks and
masks are shared state, so two requests never run on it at once. Requests beyond `max_waiting` in line are
refused (`Busy`, a 503 with Retry-After) rather than queued without bound.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from decomposer.errors import VpdError

KINDS = ("zero", "mean", "resample", "scale")
OPTIMIZE = ("none", "adversarial", "ci", "stochastic")
_GRAPH_ID = re.compile(r"^[0-9a-f]{12}$")


class Busy(Exception):
    """Too many requests are already waiting for the model."""


class TooLarge(VpdError):
    """A request that would not fit in memory."""


class Session:
    """One run served: `graph` and `intervene` under a lock, `progress` for the page.

    Args:
        run: A run folder or `bundled`.
        out: Folder that receives each graph's explorer page (`graphs/<id>.html`); nothing else is written.
        max_tokens: Longest prompt accepted, in tokens.
        max_waiting: Requests allowed to wait for the model; more get `Busy`.
        max_steps: Most optimisation steps a request may ask for.
    """

    def __init__(
        self,
        run: str | Path,
        out: str | Path,
        *,
        max_tokens: int = 256,
        max_waiting: int = 4,
        max_steps: int = 2000,
    ) -> None:
        from attrgraph.examples import card_source, examples_path, load_examples
        from attrgraph.labels import labels_for_run
        from decomposer.vpd.load import load_run
        from decomposer.vpd.report import resolve_run

        run_dir = resolve_run(run)
        self.d, self.tokenizer, _ = load_run(run)
        self.run = str(run)
        self.labels = labels_for_run(run_dir)
        source = card_source(run_dir)
        # Loaded once: each graph's cards come from memory, not from disk and a checksum.
        self.examples = load_examples(source) if source is not None and examples_path(source) else source
        self.out = Path(out)
        (self.out / "graphs").mkdir(parents=True, exist_ok=True)
        self.max_tokens, self.max_waiting, self.max_steps = max_tokens, max_waiting, max_steps
        self._lock = threading.Lock()
        self._state = threading.Lock()
        self._waiting = 0
        self._progress: dict[str, Any] = {"busy": False, "phase": None, "done": 0, "total": 0}
        self._reference: Any = None

    # -- one at a time ------------------------------------------------------------------------------

    @contextmanager
    def _turn(self, phase: str):
        with self._state:
            if self._waiting >= self.max_waiting:
                raise Busy(f"{self._waiting} requests are already waiting for the model; try again shortly.")
            self._waiting += 1
        with self._lock:
            with self._state:
                self._waiting -= 1
                self._progress = {"busy": True, "phase": phase, "done": 0, "total": 0}
            try:
                yield
            finally:
                with self._state:
                    self._progress = {"busy": False, "phase": None, "done": 0, "total": 0}

    def progress(self) -> dict[str, Any]:
        with self._state:
            return {**self._progress, "waiting": self._waiting}

    def _step(self, done: int, total: int) -> None:
        with self._state:
            self._progress.update(done=done, total=total)

    # -- checks -------------------------------------------------------------------------------------

    def check_prompt(self, prompt: Any) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise VpdError('`prompt` must be non-empty text, e.g. {"prompt": "The princess lost"}.')
        n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > self.max_tokens:
            raise TooLarge(
                f"`prompt` is {n} tokens, more than this server's {self.max_tokens}; shorten it or restart with "
                "a larger --max-tokens."
            )
        return prompt

    @staticmethod
    def _optional(body: dict, name: str, kind: type | tuple[type, ...], example: str) -> Any:
        value = body.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise VpdError(f"`{name}` must be {example}; got {value!r}.")
        return value

    # -- requests -----------------------------------------------------------------------------------

    def graph(self, body: dict, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Build, prune, label and render one prompt's graph; returns its id, summary and explorer payload."""
        from attrgraph.explorer.payload import explorer_payload
        from attrgraph.pipeline import attribute_prompt
        from attrgraph.render import render_html
        from attrgraph.settings import graph_settings

        prompt = self.check_prompt(body.get("prompt"))
        target = self._optional(body, "target", str, 'one token as text, e.g. " her"')
        position = self._optional(body, "position", int, "a token position, e.g. 2 or -1")
        optimize = body.get("optimize") or "none"
        if optimize not in OPTIMIZE:
            raise VpdError(f"`optimize` must be one of {', '.join(OPTIMIZE)}; got {optimize!r}.")
        steps = self._optional(body, "steps", int, "a number of optimisation steps, e.g. 150")
        if steps is not None and not 1 <= steps <= self.max_steps:
            raise VpdError(f"`steps` must be between 1 and {self.max_steps}; got {steps}.")
        if optimize != "none" and target is None:
            raise VpdError('`target` is required with `optimize`: name the token to explain, e.g. " her".')
        given = {"optimize": optimize} | ({"steps": steps} if steps is not None else {})
        settings = graph_settings(**given)
        with self._turn("optimize-ci" if optimize != "none" else "graph"):
            start = time.perf_counter()

            def step(done: int, total: int) -> None:
                self._step(done, total)
                if on_step is not None:
                    on_step(done, total)

            try:
                graph = attribute_prompt(
                    self.d,
                    self.tokenizer,
                    prompt,
                    target=target,
                    position=position,
                    settings=settings,
                    labels=self.labels,
                    progress=step,
                )
            except VpdError as err:
                if "needs about" in str(err):  # the memory check before the edges
                    raise TooLarge(str(err)) from None
                raise
            graph_id = uuid.uuid4().hex[:12]
            title = f"{prompt!r} → {graph.target_text!r} at position {graph.target_pos}"
            payload = explorer_payload(graph.pruned, harvest=self.examples, title=title)
            render_html(graph.pruned, self.out / "graphs" / f"{graph_id}.html", title=title, payload=payload)
            return {
                "id": graph_id,
                "html": f"/graphs/{graph_id}.html",
                "seconds": time.perf_counter() - start,
                "summary": graph.summary(),
                "payload": payload,
            }

    def intervene(self, body: dict) -> dict[str, Any]:
        """What `vpd ablate` prints for the same prompt, nodes and kind (`circuits.ablation.ablation_summary`)."""
        from circuits.ablation import ablation_summary

        prompt = self.check_prompt(body.get("prompt"))
        nodes = body.get("nodes")
        if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes) or len(nodes) > 512:
            raise VpdError(
                '`nodes` must be a list of 1 to 512 node ids or component keys, e.g. ["1.attn.q:31", '
                '"comp/model.layers.1.self_attn.q_proj/31@4"].'
            )
        kind = body.get("kind") or "zero"
        if kind not in KINDS:
            raise VpdError(f"`kind` must be one of {', '.join(KINDS)}; got {kind!r}.")
        scale = self._optional(body, "scale", int | float, "a number, the factor of kind scale")
        if (kind == "scale") != (scale is not None):
            raise VpdError(f"`scale` goes with kind scale and only with it; got kind {kind!r}, scale {scale!r}.")
        target = self._optional(body, "target", str, "one token as text")
        position = self._optional(body, "position", int, "a token position")
        generate = self._optional(body, "generate", int, "a number of tokens to continue, 0 to 64") or 0
        if not 0 <= generate <= 64:
            raise VpdError(f"`generate` must be between 0 and 64 tokens; got {generate}.")
        with self._turn("intervene"):
            reference = self.reference() if kind in ("mean", "resample") else None
            return ablation_summary(
                self.d,
                self.tokenizer,
                prompt,
                nodes,
                kind=kind,
                scale=None if scale is None else float(scale),
                target=target,
                position=position,
                generate_tokens=generate,
                reference=reference,
                name="nodes",
            )

    def reference(self) -> Any:
        """Held-out windows for `mean` and `resample`, as `vpd ablate` reads them (loaded once)."""
        if self._reference is None:
            from decomposer.vpd.batches import run_heldout_windows

            self._reference = run_heldout_windows(
                self.d.config, self.tokenizer, target=self.d.model.target, n_windows=16
            )
        return self._reference

    def graph_file(self, graph_id: str) -> Path | None:
        """The explorer page of a graph this server built, or None (ids are checked, never joined raw)."""
        if not _GRAPH_ID.match(graph_id):
            return None
        path = self.out / "graphs" / f"{graph_id}.html"
        return path if path.is_file() else None

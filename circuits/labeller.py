"""Automatic labels for subcomponents (autointerp): offline from the statistics, or from an LLM.

A `Labeller` turns one component summary (`Harvest.summary(flat, text=True)` or a card's `data`)
into a short label. `StatsLabeller` needs nothing but the statistics. `LLMLabeller` asks any
OpenAI-compatible chat endpoint, configured by three environment variables:

    VPD_LLM_BASE_URL   e.g. http://localhost:8000/v1 (the path before /chat/completions)
    VPD_LLM_API_KEY    sent as `Authorization: Bearer …`
    VPD_LLM_MODEL      the model name the endpoint expects

It uses only `urllib`, so it adds no dependency. The paper labelled from up to 30 windows at CI > 0.1.

No command calls it (labelling needs an endpoint and is never run in tests against a real one). From Python:

    labels = label_components(load_harvest("RUN"), LLMLabeller())
    Path("RUN/labels.json").write_text(json.dumps(labels))  # `vpd graph --run RUN` then shows them

or pass that file to any run with `vpd graph --labels FILE`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from attrgraph.labels import summary_label
from circuits.harvest import Harvest
from decomposer.errors import VpdError

ENV_VARS = ("VPD_LLM_BASE_URL", "VPD_LLM_API_KEY", "VPD_LLM_MODEL")
_SYSTEM = "You label the parts of a neural network's weights for interpretability research. Answer with the label only."


class Labeller(Protocol):
    """Anything that labels one component summary."""

    def label(self, summary: Mapping[str, Any]) -> str: ...


class StatsLabeller:
    """Offline labels from the token statistics, e.g. `fires on ':' ';' '=' → writes 'o' ')'` (`summary_label`)."""

    def label(self, summary: Mapping[str, Any]) -> str:
        return summary_label(summary)


def _tok(entry: Mapping[str, Any]) -> str:
    return repr(entry["token"]) if entry.get("token") is not None else f"#{entry['id']}"


def _window(example: Mapping[str, Any]) -> str:
    words = example.get("text") or [f"#{t}" for t in example["tokens"]]
    c = example["center"]
    return ("".join(words[:c]) + "<<" + words[c] + ">>" + "".join(words[c + 1 :])).replace("\n", "⏎")


def labelling_prompt(summary: Mapping[str, Any], *, max_examples: int = 30) -> str:
    """The user message sent to the LLM: rates, the characteristic tokens and example windows."""
    lines = [
        f"One rank-one subcomponent of a language model's weights fires (causal importance > threshold) on "
        f"{100 * summary['density']:.3f}% of tokens.",
        "Tokens it fires on most often (share of its firings): "
        + ", ".join(f"{_tok(t)} {100 * t['recall']:.0f}%" for t in summary.get("input", [])),
        "Tokens it fires on most specifically (PMI): " + ", ".join(_tok(t) for t in summary.get("input_pmi", [])),
        "Next tokens the model predicts more when it fires (PMI): "
        + ", ".join(_tok(t) for t in summary.get("output", [])),
        "Next tokens the model predicts less when it fires: "
        + ", ".join(_tok(t) for t in summary.get("output_bottom", [])),
    ]
    examples = [*summary.get("top_examples", []), *summary.get("random_examples", [])][:max_examples]
    if examples:
        lines.append("Contexts where it fires, the firing token in << >>:")
        lines += [f"{i}. {_window(e)}" for i, e in enumerate(examples, start=1)]
    lines.append("Reply with one label of at most 8 words saying what it responds to or does, and nothing else.")
    return "\n".join(lines)


def _clean(text: str) -> str:
    """The first non-empty line, without a `Label:` prefix or surrounding quotes, at most 80 characters."""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    if line.lower().startswith("label:"):
        line = line[6:].strip()
    return line.strip("\"'` ")[:80]


class LLMLabeller:
    """Labels from an OpenAI-compatible `/chat/completions` endpoint (arguments override the env vars).

    Raises:
        VpdError: (on construction) The base URL, API key or model is set neither here nor in the environment.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 60.0,
        max_examples: int = 30,
        max_tokens: int = 32,
    ) -> None:
        given = {"VPD_LLM_BASE_URL": base_url, "VPD_LLM_API_KEY": api_key, "VPD_LLM_MODEL": model}
        values = {name: value or os.environ.get(name, "").strip() for name, value in given.items()}
        missing = [name for name in ENV_VARS if not values[name]]
        if missing:
            raise VpdError(
                f"The LLM labeller needs {', '.join(missing)} set (an OpenAI-compatible endpoint such as "
                "VPD_LLM_BASE_URL=http://localhost:8000/v1, its key and model name); set them or use StatsLabeller."
            )
        self.url = values["VPD_LLM_BASE_URL"].rstrip("/") + "/chat/completions"
        self.api_key, self.model = values["VPD_LLM_API_KEY"], values["VPD_LLM_MODEL"]
        self.timeout, self.max_examples, self.max_tokens = timeout, max_examples, max_tokens

    def request_body(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON body POSTed for one summary."""
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": _SYSTEM},
                {"role": "user", "content": labelling_prompt(summary, max_examples=self.max_examples)},
            ],
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
        }

    def label(self, summary: Mapping[str, Any]) -> str:
        """Ask the endpoint for one label.

        Raises:
            VpdError: The endpoint cannot be reached, answers with an HTTP error, or returns no message.
        """
        request = urllib.request.Request(
            self.url,
            data=json.dumps(self.request_body(summary)).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read(200).decode(errors="replace").replace("\n", " ").strip()
            err.close()
            raise VpdError(
                f"The LLM endpoint {self.url} answered HTTP {err.code} ({detail or err.reason}); check "
                "VPD_LLM_BASE_URL, VPD_LLM_API_KEY and VPD_LLM_MODEL."
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise VpdError(
                f"The LLM endpoint {self.url} could not be reached ({reason}); check VPD_LLM_BASE_URL."
            ) from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise VpdError(
                f"The LLM endpoint {self.url} returned no `choices[0].message.content`; point VPD_LLM_BASE_URL "
                "at an OpenAI-compatible API."
            ) from None
        if not isinstance(content, str):
            raise VpdError(f"The LLM endpoint {self.url} returned a non-text message; expected a string label.")
        return _clean(content)


def label_components(
    harvest: Harvest, labeller: Labeller, keys: Iterable[str] | None = None, *, progress: bool = False
) -> dict[str, str]:
    """Component key → label for `keys` (default: every alive subcomponent), one labeller call each."""
    from tqdm.auto import tqdm

    flats = [harvest.flat_index(k) for k in keys] if keys is not None else harvest.alive.tolist()
    out = {}
    for flat in tqdm(flats, desc="label", disable=not progress):
        out[harvest.key(flat)] = labeller.label(harvest.summary(flat, text=True))
    return out

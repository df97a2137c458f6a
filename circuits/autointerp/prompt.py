"""The labelling prompt: a versioned template file, filled from one subcomponent's card, and the reply's parser.

The packaged template is `prompt-v1.md` beside this module (`load_template()`); `--template FILE` passes another
in the same format: notes, a `version: V` line, then `=== system ===` and `=== user ===` sections whose
`$placeholders` are filled by `render_messages` (see `PLACEHOLDERS`).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attrgraph.nodes import ComponentKey
from decomposer.errors import VpdError

DEFAULT_TEMPLATE = Path(__file__).with_name("prompt-v1.md")
MAX_LABEL_CHARS = 80
PLACEHOLDERS = (
    "key",
    "location",
    "tau",
    "density",
    "n_tokens",
    "rate",
    "inputs",
    "words",
    "outputs",
    "outputs_bottom",
    "logit_lens",
    "n_contexts",
    "contexts",
)
_SECTION = re.compile(r"^=== *(\w+) *===\s*$", re.M)
_MATRIX_NAMES = {
    "q": "query projection (q) of attention",
    "k": "key projection (k) of attention",
    "v": "value projection (v) of attention",
    "qkv": "fused query/key/value projection of attention",
    "o": "output projection (o) of attention",
    "gate": "gate projection of the MLP",
    "up": "up projection of the MLP",
    "gate_up": "fused gate/up projection of the MLP",
    "down": "down projection of the MLP",
}


@dataclass(frozen=True)
class PromptTemplate:
    """A labelling prompt: its declared `version`, the `system` and `user` texts, and `sha` of the whole file."""

    version: str
    system: str
    user: str
    sha: str
    path: Path


def load_template(path: str | Path | None = None) -> PromptTemplate:
    """Read a template file (default: the packaged `prompt-v1.md`).

    Raises:
        VpdError: The file is missing, has no `version:` line, lacks a section, or names an unknown placeholder.
    """
    path = Path(path) if path is not None else DEFAULT_TEMPLATE
    fix = "see circuits/autointerp/prompt-v1.md for the format"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise VpdError(f"`--template` {str(path)!r} cannot be read ({err}); pass a UTF-8 template file.") from None
    parts = _SECTION.split(text)
    head, sections = parts[0], dict(zip(parts[1::2], parts[2::2], strict=True))
    version = re.search(r"^version:\s*(\S+)\s*$", head, re.M)
    if version is None:
        raise VpdError(f"Template {str(path)!r} has no `version: V` line before its first section; {fix}.")
    missing = [name for name in ("system", "user") if name not in sections]
    if missing:
        raise VpdError(f"Template {str(path)!r} lacks the section(s) {', '.join(missing)}; {fix}.")
    for name in ("system", "user"):
        unknown = sorted(set(string.Template(sections[name]).get_identifiers()) - set(PLACEHOLDERS))
        if unknown:
            raise VpdError(
                f"Template {str(path)!r} uses unknown placeholder(s) {', '.join('$' + u for u in unknown)}; "
                f"known: {', '.join('$' + p for p in PLACEHOLDERS)}."
            )
    return PromptTemplate(
        version=version[1],
        system=sections["system"].strip(),
        user=sections["user"].strip(),
        sha=hashlib.sha256(text.encode()).hexdigest()[:12],
        path=path,
    )


def describe_location(key: str) -> str:
    """`1.attn.q:31` → `subcomponent 31 of the query projection (q) of attention in block 1 (counting from 0)`."""
    try:
        parsed = ComponentKey.parse(key)
    except VpdError:
        return f"subcomponent {key}"
    parts = parsed.matrix.split(".")
    block, short = parts[0], parts[-1]
    name = _MATRIX_NAMES.get(short)
    if name is None or not block.isdigit():
        return f"subcomponent {parsed.index} of the matrix {parsed.matrix}"
    return f"subcomponent {parsed.index} of the {name} in block {block} (counting from 0)"


def _show(token: str) -> str:
    return json.dumps(token, ensure_ascii=False)  # quotes make leading spaces and control characters visible


def _percent(x: Any) -> str:
    if not isinstance(x, int | float):
        return "?"
    return f"{100 * x:.2g}%" if x < 0.01 else f"{100 * x:.0f}%"


def _lines(entries: list[str], empty: str = "(none)") -> str:
    return "\n".join(f"- {e}" for e in entries) if entries else empty


def _context(context: Mapping[str, Any]) -> str:
    words = [w.replace("\n", "⏎").replace("\r", "") for w in context["text"]]
    c = context["center"]
    return "".join(words[:c]) + "<<" + words[c] + ">>" + "".join(words[c + 1 :])


def fill_values(card: Mapping[str, Any], *, max_contexts: int = 30) -> dict[str, str]:
    """The placeholder values for one card (`ComponentExamples.card`)."""
    density = card.get("density")
    n_tokens = card.get("n_tokens")
    tau = card.get("tau_fire")
    rate = f"about 1 in {round(1 / density):,} tokens" if isinstance(density, int | float) and density > 0 else "rare"
    inputs = [
        f"{_show(e['token'])}: precision {_percent(e.get('precision'))}, recall {_percent(e.get('recall'))}"
        for e in card.get("inputs") or []
    ]
    words = [f"{_show(str(w))}: {_percent(share)}" for w, share in card.get("words") or []]

    def pmi(entries: list[Mapping[str, Any]]) -> list[str]:
        return [
            f"{_show(e['token'])}: {e['pmi']:+.2f}" if isinstance(e.get("pmi"), int | float) else _show(e["token"])
            for e in entries
        ]

    promotes = ", ".join(_show(e["token"]) for e in card.get("promotes") or [])
    suppresses = ", ".join(_show(e["token"]) for e in card.get("suppresses") or [])
    if promotes or suppresses:
        lens = f"- promotes: {promotes or '(none)'}\n- suppresses: {suppresses or '(none)'}"
    else:
        lens = "(not applicable: this matrix does not write to the residual stream directly)"
    contexts = list(card.get("contexts") or [])[:max_contexts]
    return {
        "key": str(card["key"]),
        "location": describe_location(str(card["key"])),
        "tau": f"{tau:g}" if isinstance(tau, int | float) else "the threshold",
        "density": _percent(density),
        "n_tokens": f"{n_tokens:,}" if isinstance(n_tokens, int) else "harvested",
        "rate": rate,
        "inputs": _lines(inputs),
        "words": _lines(words),
        "outputs": _lines(pmi(card.get("outputs") or [])),
        "outputs_bottom": _lines(pmi(card.get("outputs_bottom") or [])),
        "logit_lens": lens,
        "n_contexts": str(len(contexts)),
        "contexts": "\n".join(f"{i}. {_context(c)}" for i, c in enumerate(contexts, start=1)) or "(none)",
    }


def render_messages(template: PromptTemplate, card: Mapping[str, Any], *, max_contexts: int = 30) -> list[dict]:
    """The chat messages (system, user) asking for one subcomponent's label."""
    values = fill_values(card, max_contexts=max_contexts)
    return [
        {"role": "system", "content": string.Template(template.system).safe_substitute(values)},
        {"role": "user", "content": string.Template(template.user).safe_substitute(values)},
    ]


class ReplyRejected(Exception):
    """A reply that gives no label; `kind` is `refusal`, `malformed` or `unclear`."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


_REFUSAL = re.compile(
    r"^(i('m| am)? (sorry|unable|not able)|i (can ?not|can'?t|won'?t|will not|do not|don'?t)\b|sorry\b|"
    r"as an ai\b|unfortunately\b|i apologi[sz]e)",
    re.I,
)
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


def parse_label(content: Any, *, finish_reason: Any = None, refusal: Any = None) -> str:
    """The label in one reply: its first line without `Label:`, markdown or quotes, at most 80 characters.

    Accepts a JSON object with a `label` field, and drops a reasoning model's `<think>…</think>` block.

    Raises:
        ReplyRejected: The model refused (`refusal` set, a content filter, or an apology), the reply holds no
            text, or it answered "unclear" (kind `unclear`: a finished request, but not a label to show).
    """
    if refusal:
        raise ReplyRejected("refusal", f"refused: {_snippet(str(refusal))}")
    if finish_reason == "content_filter":
        raise ReplyRejected("refusal", "refused: stopped by the endpoint's content filter")
    if not isinstance(content, str):
        raise ReplyRejected("malformed", f"malformed reply: message content is {type(content).__name__}, not text")
    text = _THINK.sub("", content).strip()
    if text.lower().startswith("<think>"):
        raise ReplyRejected("malformed", "malformed reply: cut off while reasoning (raise --max-tokens)")
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("label"), str):
            text = obj["label"]
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    line = re.sub(r"^(#+|[-*•]|\d+[.)])\s+", "", line).replace("**", "").strip()
    line = re.sub(r"^label\s*[:：-]\s*", "", line, flags=re.I)
    line = line.strip().rstrip(".").strip()
    for left, right in ('""', "''", "``", "“”", "‘’"):
        if len(line) > 1 and line[0] == left and line[-1] == right:
            line = line[1:-1].strip()
    if not line:
        raise ReplyRejected("malformed", "malformed reply: no text")
    if _REFUSAL.match(line):
        raise ReplyRejected("refusal", f"refused: {_snippet(line)}")
    if line.lower().strip(" .!") == "unclear":
        raise ReplyRejected("unclear", "unclear")
    if len(line) > MAX_LABEL_CHARS:
        line = line[:MAX_LABEL_CHARS].rsplit(" ", 1)[0] if " " in line[:MAX_LABEL_CHARS] else line[:MAX_LABEL_CHARS]
    return line


def _snippet(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"

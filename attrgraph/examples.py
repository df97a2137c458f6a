"""The examples artifact, `<run>/examples/`: what a reader needs to read each alive subcomponent.

A harvest (`circuits.harvest`) keeps every count of its pass and runs to hundreds of megabytes. This
artifact keeps, per alive subcomponent, only what a person looks at: its top activating contexts (token ids
around the firing token with CI per token), the tokens it fires on and what it writes, its density, the
subcomponents it co-fires with, the whole words it fires inside, and an offline label. A few megabytes, so a
run can ship it. `circuits.harvest` writes it beside the harvest; the explorer, `vpd graph`, `vpd demo` and
`vpd autointerp` read it from here, so this layer defines it and never imports `circuits`.

    examples/                   written atomically as one directory
      examples.safetensors      per-row tensors (below), rows in the order of `keys`
      examples.json             format, format_version, how it was made, keys, vocab, words, labels,
                                files {name: sha256} of the tensors file, checked when it is read

Tensors (n rows, k contexts, w = 2·window + 1 tokens, L tokens per list, P partners; −1 pads ids):

    density, mean_ci (n,) float32; firing_count (n,) int64
    context_tokens (n, k, w) int16 or int32, the firing token at index `window`
    context_ci (n, k, w) uint8                             CI per token × 255 (enough to shade a token)
    input_tokens, input_precision, input_recall (n, L)     tokens it fires on, by P(fires | token)
    output_tokens, output_pmi (n, L)                       next tokens it makes likelier, by PMI
    output_bottom_tokens, output_bottom_pmi (n, L)         next tokens it makes less likely
    promote_tokens, promote_logit, suppress_tokens, suppress_logit (n, L)
                                                           logit lens of the write direction u_c (rows of
                                                           matrices that write the residual stream; −1 elsewhere)
    cofire_rows, cofire_jaccard (n, P)                     co-firing partners (rows), by Jaccard
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from decomposer.errors import ArtifactFormatError, VpdError
from decomposer.integrity import check_sha256, load_safetensors, record_sha256
from decomposer.io import atomic_write_dir, atomic_write_text, resolve_atomic_dir

EXAMPLES_DIR = "examples"
EXAMPLES_META = "examples.json"
EXAMPLES_TENSORS = "examples.safetensors"
EXAMPLES_FORMAT = "subcomponent-examples"
EXAMPLES_FORMAT_VERSION = 1
_FIX = "run `vpd harvest` again"

# (name of a ranked token list in a card, its token tensor, its score tensors)
_TOKEN_LISTS = (
    ("inputs", "input_tokens", ("input_precision", "input_recall")),
    ("outputs", "output_tokens", ("output_pmi",)),
    ("outputs_bottom", "output_bottom_tokens", ("output_bottom_pmi",)),
    ("promotes", "promote_tokens", ("promote_logit",)),
    ("suppresses", "suppress_tokens", ("suppress_logit",)),
)


@dataclass(frozen=True, eq=False)
class ComponentExamples:
    """Examples and statistics of every alive subcomponent of one run; row i describes `keys[i]`.

    Attributes:
        keys: Component keys (`1.attn.q:31`) of the alive subcomponents, the row order of every tensor.
        vocab: Decoded token strings by id.
        window: Tokens either side of the firing token in each context.
        made: How the artifact was made (tokens harvested, τ, source, command), shown to readers as is.
        words: Per key, the whole words the firing token sits in, as [word, share of sampled firings] pairs.
        labels: Per key, the offline label (`attrgraph.labels.card_label`).
        tensors: The per-row tensors named in the module docstring.
    """

    keys: tuple[str, ...]
    vocab: tuple[str, ...]
    window: int
    made: dict[str, Any]
    words: dict[str, list[list[Any]]]
    labels: dict[str, str]
    tensors: dict[str, Tensor]
    _row: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_row", {k: i for i, k in enumerate(self.keys)})
        n = len(self.keys)
        for name, t in self.tensors.items():
            if t.shape[0] != n:
                raise ArtifactFormatError(f"examples tensor {name!r} has {t.shape[0]} rows for {n} keys; {_FIX}.")

    def __contains__(self, key: object) -> bool:
        return key in self._row

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_contexts(self) -> int:
        return int(self.tensors["context_tokens"].shape[1])

    def token_text(self, token: int) -> str:
        return self.vocab[token] if 0 <= token < len(self.vocab) else f"#{token}"

    def _tokens(self, row: int, ids: str, scores: tuple[str, ...], limit: int) -> list[dict[str, Any]]:
        out = []
        columns = [self.tensors[s][row].tolist() for s in scores]
        for j, token in enumerate(self.tensors[ids][row, :limit].tolist()):
            if token < 0:
                break
            entry: dict[str, Any] = {"id": token, "token": self.token_text(token)}
            for name, col in zip(scores, columns, strict=True):
                entry[name.rsplit("_", 1)[-1]] = _round(col[j])
            out.append(entry)
        return out

    def contexts(self, key: str, n: int | None = None) -> list[dict[str, Any]]:
        """The top `n` (default all) contexts of `key`, best first: token ids, strings, firing index, CI per token."""
        row = self._row[key]
        out = []
        tokens = self.tensors["context_tokens"][row, :n].tolist()
        cis = (self.tensors["context_ci"][row, :n].float() / 255).tolist()
        for ids, ci in zip(tokens, cis, strict=True):
            if ids[self.window] < 0:
                break
            keep = [j for j, t in enumerate(ids) if t >= 0]  # the window is cut at the sequence's ends
            lo, hi = keep[0], keep[-1] + 1
            out.append(
                {
                    "tokens": ids[lo:hi],
                    "text": [self.token_text(t) for t in ids[lo:hi]],
                    "center": self.window - lo,
                    "ci": [round(x, 3) for x in ci[lo:hi]],
                }
            )
        return out

    def card(self, key: str, *, n_contexts: int | None = 10, list_size: int = 8) -> dict[str, Any] | None:
        """Everything known about `key` as a JSON-ready dict, or None when it is not an alive subcomponent.

        Fields: key, density, mean_ci, firing_count, inputs (token, precision, recall), outputs (token, pmi),
        outputs_bottom, promotes and suppresses (token, logit), words, cofiring (key, jaccard), contexts
        (`contexts`), label, and `n_tokens` / `tau_fire` of the pass.
        """
        row = self._row.get(key)
        if row is None:
            return None
        t = self.tensors
        card: dict[str, Any] = {
            "key": key,
            "density": _round(float(t["density"][row])),
            "mean_ci": _round(float(t["mean_ci"][row])),
            "firing_count": int(t["firing_count"][row]),
            "n_tokens": self.made.get("n_tokens"),
            "tau_fire": self.made.get("tau_fire"),
        }
        for name, ids, scores in _TOKEN_LISTS:
            card[name] = self._tokens(row, ids, scores, list_size)
        card["words"] = self.words.get(key, [])
        partners = t["cofire_rows"][row].tolist()
        jaccard = t["cofire_jaccard"][row].tolist()
        card["cofiring"] = [
            {"key": self.keys[p], "jaccard": _round(j), "label": self.labels.get(self.keys[p], "")}
            for p, j in zip(partners, jaccard, strict=True)
            if p >= 0
        ][:list_size]
        card["contexts"] = self.contexts(key, n_contexts)
        card["label"] = self.labels.get(key, "")
        return card

    def save(self, folder: str | Path) -> Path:
        """Write `<folder>/examples/` atomically; return it."""
        meta = {
            "format": EXAMPLES_FORMAT,
            "format_version": EXAMPLES_FORMAT_VERSION,
            "made": self.made,
            "window": self.window,
            "keys": list(self.keys),
            "vocab": list(self.vocab),
            "words": self.words,
            "labels": self.labels,
        }

        def fill(tmp: Path) -> None:
            tensors = {name: t.contiguous() for name, t in self.tensors.items()}
            save_file(
                tensors,
                tmp / EXAMPLES_TENSORS,
                metadata={"format": EXAMPLES_FORMAT, "format_version": str(EXAMPLES_FORMAT_VERSION)},
            )
            os.chmod(tmp / EXAMPLES_TENSORS, 0o644)  # readable like the JSON beside it, e.g. once shipped in a package
            meta["files"] = record_sha256(tmp, [EXAMPLES_TENSORS])
            atomic_write_text(tmp / EXAMPLES_META, json.dumps(meta, ensure_ascii=False, separators=(",", ":")) + "\n")

        return atomic_write_dir(Path(folder) / EXAMPLES_DIR, fill)


_REQUIRED = (
    "density",
    "mean_ci",
    "firing_count",
    "context_tokens",
    "context_ci",
    "cofire_rows",
    "cofire_jaccard",
    *(name for _, ids, scores in _TOKEN_LISTS for name in (ids, *scores)),
)


def _round(x: float, digits: int = 4) -> float | None:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def examples_path(folder: str | Path) -> Path | None:
    """The `examples/` folder of a run (or an output folder of `vpd harvest`), or the folder itself; else None."""
    folder = Path(folder)
    if (folder / EXAMPLES_META).is_file():
        return folder
    found = resolve_atomic_dir(folder / EXAMPLES_DIR)
    if found is not None and (found / EXAMPLES_META).is_file():
        return found
    return None


def load_examples(folder: str | Path, *, arg: str = "--examples") -> ComponentExamples:
    """Read an examples artifact from a run folder, a `vpd harvest --out` folder or the `examples/` folder itself.

    Raises:
        VpdError: There is none there.
        ArtifactFormatError: It is not an examples artifact, or has a version this release cannot read.
        DamagedArtifactError: Its tensors differ from the sha256 recorded when it was written.
    """
    path = examples_path(folder)
    if path is None:
        raise VpdError(
            f"`{arg}` {str(folder)!r} holds no examples/ folder; run `vpd harvest --run RUN` to write one, "
            "or pass a run that has one."
        )
    meta_file = path / EXAMPLES_META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ArtifactFormatError(f"{meta_file} cannot be read ({err}); {_FIX}.") from None
    if not isinstance(meta, dict) or meta.get("format") != EXAMPLES_FORMAT:
        raise ArtifactFormatError(f"{meta_file} is not an examples artifact (format {EXAMPLES_FORMAT!r}); {_FIX}.")
    if meta.get("format_version") != EXAMPLES_FORMAT_VERSION:
        raise ArtifactFormatError(
            f"{meta_file} has format_version {meta.get('format_version')!r}, but this release reads version "
            f"{EXAMPLES_FORMAT_VERSION}; upgrade the package or {_FIX}."
        )
    check_sha256(path, meta.get("files", {}), fix=_FIX)
    tensors = load_safetensors(path / EXAMPLES_TENSORS, fix=_FIX)
    missing = [name for name in _REQUIRED if name not in tensors]
    if missing:
        raise ArtifactFormatError(f"{path / EXAMPLES_TENSORS} lacks {', '.join(missing[:4])}; {_FIX}.")
    return ComponentExamples(
        keys=tuple(meta["keys"]),
        vocab=tuple(meta["vocab"]),
        window=int(meta["window"]),
        made=dict(meta.get("made") or {}),
        words={k: list(v) for k, v in (meta.get("words") or {}).items()},
        labels={k: str(v) for k, v in (meta.get("labels") or {}).items()},
        tensors=tensors,
    )


def card_from_summary(summary: Mapping[str, Any], vocab: list[str] | None = None) -> dict[str, Any]:
    """A card (the fields `ComponentExamples.card` returns) from a `harvest.json` summary of one subcomponent."""

    def text(t: Any) -> str:
        return vocab[t] if vocab and isinstance(t, int) and 0 <= t < len(vocab) else f"#{t}"

    def tokens(name: str, *scores: str) -> list[dict[str, Any]]:
        rows = []
        for e in summary.get(name) or []:
            row = {"id": e.get("id"), "token": e.get("token") if e.get("token") is not None else text(e.get("id"))}
            rows.append(row | {s: e.get(s) for s in scores})
        return rows

    contexts = []
    for e in summary.get("top_examples") or []:
        words = e.get("text") or [text(t) for t in e.get("tokens", [])]
        window = e.get("ci_window")
        ci = list(window) if isinstance(window, list) and len(window) == len(words) else [0.0] * len(words)
        center = int(e.get("center", 0))
        if not window and isinstance(e.get("ci"), int | float) and 0 <= center < len(ci):
            ci[center] = float(e["ci"])
        contexts.append({"tokens": e.get("tokens", []), "text": [str(w) for w in words], "center": center, "ci": ci})
    inputs = next((name for name in ("input_precision", "input_pmi") if summary.get(name)), "input")
    return {
        "key": summary.get("key"),
        "density": summary.get("density"),
        "mean_ci": summary.get("mean_ci"),
        "firing_count": summary.get("firing_count"),
        "inputs": tokens(inputs, "precision", "recall"),
        "outputs": tokens("output", "pmi"),
        "outputs_bottom": tokens("output_bottom", "pmi"),
        "promotes": [],
        "suppresses": [],
        "words": [],
        "cofiring": [{"key": e.get("key"), "jaccard": e.get("jaccard")} for e in summary.get("cofiring") or []],
        "contexts": contexts,
        "label": summary.get("label") or "",
    }


def _harvest_cards(folder: Path) -> tuple[Mapping[str, Any], list[str] | None] | None:
    """(summaries, vocab) of a folder's `harvest.json` (a harvest written before examples existed), or None."""
    from attrgraph.harvest_format import harvest_meta_path, read_harvest_meta

    path = harvest_meta_path(folder)
    if path is None:
        return None
    meta = read_harvest_meta(path)
    vocab = meta.get("vocab")
    return meta.get("components", {}), [str(v) for v in vocab] if isinstance(vocab, list) else None


def cards_for(source: Any, keys: list[str], **card_args: Any) -> dict[str, dict[str, Any]]:
    """Key → card for the `keys` that `source` knows.

    `source` is a `ComponentExamples`; a folder holding `examples/` (or, from an older harvest, only
    `harvest.json`); or a mapping of key → card or key → `harvest.json` summary. None gives {}.

    Raises:
        VpdError: A folder holds neither examples nor a harvest.
    """
    if source is None:
        return {}
    if isinstance(source, str | Path):
        if examples_path(source) is not None:
            source = load_examples(source, arg="harvest")
        else:
            found = _harvest_cards(Path(source))
            if found is None:
                raise VpdError(
                    f"`harvest` {str(source)!r} holds no examples/ folder and no harvest.json; run `vpd harvest "
                    "--run RUN` first, or leave it out."
                )
            summaries, vocab = found
            return {k: card_from_summary(summaries[k], vocab) for k in dict.fromkeys(keys) if k in summaries}
    if isinstance(source, ComponentExamples):
        cards = {k: source.card(k, **card_args) for k in dict.fromkeys(keys)}
    elif isinstance(source, Mapping):
        cards = {}
        for k in dict.fromkeys(keys):
            c = source.get(k)
            cards[k] = None if c is None else c if "contexts" in c else card_from_summary(c)
    else:
        raise VpdError(
            f"Card source of type {type(source).__name__} is not supported; pass a run folder with examples/, a "
            "`ComponentExamples`, or a mapping of component key → card."
        )
    return {k: dict(c) for k, c in cards.items() if c is not None}


def card_source(run_dir: str | Path, given: str | Path | None = None, *, arg: str = "--harvest") -> Path | None:
    """The folder whose examples fill a run's cards: `given` when passed (checked), else the run's own, else None.

    Raises:
        VpdError: `given` holds neither `examples/` nor a `harvest.json`.
    """
    from attrgraph.harvest_format import harvest_meta_path

    if given is not None:
        if examples_path(given) is None and harvest_meta_path(given) is None:
            raise VpdError(
                f"`{arg}` {str(given)!r} holds no examples/ folder and no harvest.json; run `vpd harvest --run RUN "
                "--out DIR` and pass DIR, or leave it out."
            )
        return Path(given)
    if examples_path(run_dir) is not None or harvest_meta_path(run_dir) is not None:
        return Path(run_dir)
    return None


def tensor_names() -> tuple[str, ...]:
    """Every tensor an examples artifact holds."""
    return _REQUIRED


__all__ = [
    "EXAMPLES_DIR",
    "ComponentExamples",
    "cards_for",
    "examples_path",
    "load_examples",
]

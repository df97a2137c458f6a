"""Short labels for subcomponents: from a run's harvest statistics, or from a user's JSON or CSV file.

A label is keyed by either

- a component key, `{block}.{attn|mlp}.{short}:{c}` such as `1.attn.q:31`, which labels the
  subcomponent at every position, or
- a canonical node id such as `comp/model.layers.1.self_attn.q_proj/31@4`, which labels one node.

`label_for(labels, node)` looks a node up by its id first, then by its component key. The harvest
files are written by `circuits.harvest`; their names and format are defined in `attrgraph.harvest_format`.

Every label carries its source (`Label.source`): `stats` for the offline label computed from a run's
statistics (`card_label`), `llm` for one written by `vpd autointerp`, `user` for a file the user passes.
The explorer shows which kind each node has. A label file is a plain JSON object (key → label, source
`user`), a CSV file (`node,label`), or the versioned object that `vpd autointerp` writes:

    {"format": "vpd-labels", "format_version": 1, "source": "llm", "model": "...", "labels": {key: label}}

`labels_for_run` reads, later ones winning: the run's offline labels (`examples/`, else `harvest/`), its
`labels.json`, then its `autointerp/labels.json`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attrgraph.harvest_format import harvest_meta_path, read_harvest_meta
from attrgraph.nodes import ComponentKey, NodeId
from decomposer.errors import VpdError

RUN_LABELS = "labels.json"  # optional component key → label file in a run folder
AUTOINTERP_LABELS = ("autointerp", "labels.json")  # what `vpd autointerp` writes inside a run or --out folder
LABELS_FORMAT = "vpd-labels"
LABELS_FORMAT_VERSION = 1
SOURCES = ("stats", "llm", "user")


class Label(str):
    """A label string that remembers where it came from: `stats`, `llm` or `user` (see the module docstring)."""

    source: str

    def __new__(cls, text: str, source: str = "user") -> Label:
        if source not in SOURCES:
            raise VpdError(f"Label source {source!r} is not one of {', '.join(SOURCES)}.")
        label = super().__new__(cls, text)
        label.source = source
        return label

    def __reduce__(self) -> tuple:
        return (Label, (str(self), self.source))


def label_source(label: str | None) -> str | None:
    """`stats`, `llm` or `user` for a label (a plain string counts as `user`); None for no label."""
    if label is None:
        return None
    return getattr(label, "source", "user")


_EXAMPLE_KEYS = "a component key such as 1.attn.q:31 or a node id such as comp/model.layers.1.self_attn.q_proj/31@4"


def component_key(module: str, c: int) -> str:
    """`str(ComponentKey.of(module, c))`: `{block}.{sublayer}.{short}:{c}` (e.g. `1.attn.q:31`), else `{module}:{c}`."""
    return str(ComponentKey.of(module, c))


def label_for(labels: Mapping[str, str], node: NodeId | str) -> str | None:
    """The label of `node`: by its canonical id, else (for a subcomponent) by its component key, else None."""
    node = NodeId.parse(node) if isinstance(node, str) else node
    label = labels.get(str(node))
    if label is None and node.kind == "comp":
        assert node.module is not None and node.index is not None, f"incomplete comp node {node!r}"
        label = labels.get(component_key(node.module, node.index))
    return label


def _token_text(entry: Mapping[str, Any]) -> str:
    token = entry.get("token")
    return repr(token) if token is not None else f"#{entry['id']}"


def _near_top(entries: list[Mapping[str, Any]], limit: int) -> list[Mapping[str, Any]]:
    """The first `limit` entries within a factor of two of the top one's precision (or PMI, or recall).

    Half the precision is the PMI minus log 2, so the rule reads the same on either ranking.
    """
    if not entries:
        return []
    for field, near in (("precision", lambda x, top: x >= top / 2), ("pmi", lambda x, top: x >= top - math.log(2))):
        top = entries[0].get(field)
        if isinstance(top, int | float) and math.isfinite(top):
            return [e for e in entries[:limit] if isinstance(e.get(field), int | float) and near(e[field], top)]
    top = entries[0].get("recall")
    if isinstance(top, int | float):
        return [e for e in entries[:limit] if isinstance(e.get("recall"), int | float) and e["recall"] >= top / 2]
    return list(entries[:1])


def summary_label(summary: Mapping[str, Any], *, n_inputs: int = 3, n_outputs: int = 2) -> str:
    """What a subcomponent is specific to, from its harvest summary: e.g. `fires on ':' ';' '=' → writes 'o' ')'`.

    The input side names the tokens it fires on most reliably: `input_precision`, ranked by
    P(fires | token) among tokens that make up a share of its firings (summaries written before it
    existed fall back to `input_pmi`, then to `input` by recall). The output side names the tokens
    it makes more likely than usual: `output`, ranked by PMI, where positive. On each side only the
    tokens within a factor of two of the top one are named. An empty string without token statistics.
    """
    inputs = summary.get("input_precision") or summary.get("input_pmi") or summary.get("input") or []
    outputs = [e for e in summary.get("output") or [] if not isinstance(e.get("pmi"), int | float) or e["pmi"] > 0]
    parts = []
    if inputs:
        parts.append("fires on " + " ".join(_token_text(t) for t in _near_top(list(inputs), n_inputs)))
    if outputs:
        parts.append("writes " + " ".join(_token_text(t) for t in _near_top(outputs, n_outputs)))
    return " → ".join(parts)


def _quoted(token: str) -> str:
    return repr(token)


def _fragment_words(card: Mapping[str, Any], top: str, limit: int = 3, min_share: float = 0.1) -> list[str]:
    """Whole words the firing token sits in, when they say more than the token itself (a BPE fragment)."""
    bare = top.strip().lower()
    words = [
        str(w)
        for w, share in card.get("words") or []
        if isinstance(share, int | float) and share >= min_share and bare and bare in str(w).lower()
    ]
    return [w for w in words if w.lower() != bare][:limit]


def _f1(entry: Mapping[str, Any]) -> float:
    p, r = entry.get("precision"), entry.get("recall")
    if not (isinstance(p, int | float) and isinstance(r, int | float)) or p + r <= 0:
        return 0.0
    return 2 * p * r / (p + r)


def card_label(card: Mapping[str, Any], *, n_inputs: int = 2, n_outputs: int = 2) -> str:
    """An offline label from a subcomponent's card (`attrgraph.examples.ComponentExamples.card`).

    Input side: the tokens it fires on, as the card ranks them (precision and recall together), the second
    named only when it scores at least half the first; the top token's precision, P(fires | token); the whole
    words a fragment sits in (`fires on 84% of 'ou' in could, would`); and its breadth when it fires on ≥ 20%
    of all tokens. Output side: for an o or down subcomponent whose output direction, read through the
    unembedding, promotes tokens the model does predict more when it fires, those tokens and the one it
    suppresses most; otherwise the next tokens the model predicts more when it fires (PMI > 0). The lens alone
    is not trusted: in early blocks it names fragments the model never predicts there.
    E.g. `fires on 96% of ' so' → next ' long' ' far'`. Empty without statistics.
    """
    parts = []
    density = card.get("density")
    broad = isinstance(density, int | float) and density >= 0.2
    inputs = [e for e in card.get("inputs") or [] if e.get("token") is not None]
    if inputs:
        head = inputs[0]
        named = [head] + [e for e in inputs[1:n_inputs] if _f1(e) >= _f1(head) / 2]
        precision = head.get("precision")
        share = ""
        if isinstance(precision, int | float) and precision > 0:
            share = f"{100 * precision:.0f}% of " if precision >= 0.01 else "<1% of "
        text = share + _quoted(head["token"])
        words = _fragment_words(card, str(head["token"]))
        if words:
            text += " in " + ", ".join(words)
        if len(named) > 1:
            text += ", also " + ", ".join(_quoted(e["token"]) for e in named[1:])
        parts.append((f"broad ({100 * density:.0f}% of tokens), " if broad else "") + "fires on " + text)
    elif broad:
        parts.append(f"fires on {100 * density:.0f}% of tokens")
    outputs = [e for e in card.get("outputs") or [] if isinstance(e.get("pmi"), int | float) and e["pmi"] > 0]
    promotes = [e for e in card.get("promotes") or [] if e.get("token") is not None]
    suppresses = [e for e in card.get("suppresses") or [] if e.get("token") is not None][:1]
    seen = {e.get("id") for e in outputs}
    agreed = [e for e in promotes[:3] if e.get("id") in seen]
    if agreed:
        write = "promotes " + " ".join(_quoted(e["token"]) for e in agreed[:n_outputs])
        if suppresses:
            write += ", suppresses " + _quoted(suppresses[0]["token"])
        parts.append(write)
    elif outputs:
        parts.append("next " + " ".join(_quoted(e["token"]) for e in _near_top(outputs, n_outputs)))
    return " → ".join(parts)


def labels_for_run(run_dir: str | Path) -> dict[str, Label]:
    """Component key → `Label` for a run: offline labels, then `labels.json`, then `autointerp/labels.json`.

    The offline labels come from the run's examples artifact (`examples/`) or, without one, from its harvest
    summaries; each later source wins where it has a key. {} when the folder has none of them.

    Args:
        run_dir: A run folder, a `vpd harvest --out` / `vpd autointerp --out` folder, or a harvest folder.

    Raises:
        ArtifactFormatError: An artifact has a format version this release cannot read.
        VpdError: A label file is malformed.
    """
    from attrgraph.examples import examples_path, load_examples

    run_dir = Path(run_dir)
    labels: dict[str, Label] = {}
    if examples_path(run_dir) is not None:
        labels = {k: Label(v, "stats") for k, v in load_examples(run_dir).labels.items()}
    else:
        path = harvest_meta_path(run_dir)
        if path is not None:
            components = read_harvest_meta(path).get("components", {})
            labels = {key: Label(summary_label(summary), "stats") for key, summary in components.items()}
    for extra in (run_dir / RUN_LABELS, run_dir.joinpath(*AUTOINTERP_LABELS)):
        if extra.is_file():
            labels.update(read_label_file(extra))
    return {key: label for key, label in labels.items() if label}


def _check_key(key: Any, where: str, path: Path) -> str:
    if isinstance(key, str):
        key = key.strip()
        for parse in (ComponentKey.parse, NodeId.parse):
            try:
                parsed = parse(key)
            except VpdError:
                continue
            # A label names a subcomponent at every position, or one node by its canonical id.
            if not isinstance(parsed, ComponentKey) or parsed.pos is None:
                return str(parsed)
    raise VpdError(f"Label file {str(path)!r}: {where} key {key!r} is neither {_EXAMPLE_KEYS}.")


def _versioned_labels(path: Path, data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(key → label, source) of a `vpd-labels` file, with its version and source checked."""
    if data.get("format_version") != LABELS_FORMAT_VERSION:
        raise VpdError(
            f"Label file {str(path)!r} has format_version {data.get('format_version')!r}, but this release reads "
            f"version {LABELS_FORMAT_VERSION}; upgrade the package or write the labels again."
        )
    source, labels = data.get("source", "user"), data.get("labels")
    if source not in SOURCES or not isinstance(labels, dict):
        raise VpdError(
            f"Label file {str(path)!r} needs a `source` among {', '.join(SOURCES)} and a `labels` object; got "
            f"source {source!r} and labels of type {type(labels).__name__}."
        )
    return labels, source


def _read_json_labels(path: Path, text: str) -> dict[str, Label]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise VpdError(
            f"Label file {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}); "
            'write one object such as {"1.attn.q:31": "her"}.'
        ) from None
    if not isinstance(data, dict):
        raise VpdError(
            f'Label file {str(path)!r} holds a JSON {type(data).__name__}; write one object such as {{"1.attn.q:31": '
            '"her"}.'
        )
    source = "user"
    if data.get("format") == LABELS_FORMAT:
        data, source = _versioned_labels(path, data)
    out = {}
    for key, label in data.items():
        checked = _check_key(key, "the", path)
        if not isinstance(label, str):
            raise VpdError(f"Label file {str(path)!r}: the label of {key!r} is {label!r}; labels must be strings.")
        out[checked] = Label(label, source)
    return out


def _read_csv_labels(path: Path, text: str) -> dict[str, str]:
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as err:
        raise VpdError(f"Label file {str(path)!r} is not valid CSV ({err}); write columns node,label.") from None
    columns = [c.strip() for c in (csv.DictReader(io.StringIO(text)).fieldnames or [])]
    missing = [c for c in ("node", "label") if c not in columns]
    if missing:
        raise VpdError(
            f"Label file {str(path)!r} lacks the column(s) {', '.join(missing)} (found {columns or 'none'}); "
            "write a header row node,label."
        )
    out = {}
    for i, row in enumerate(rows, start=2):  # row 1 is the header
        row = {(k or "").strip(): v for k, v in row.items()}
        node, label = row.get("node"), row.get("label")
        if label is None:
            raise VpdError(f"Label file {str(path)!r}: row {i} has no label; write node,label on every row.")
        out[_check_key(node, f"row {i}", path)] = Label(label, "user")
    return out


def read_label_file(path: str | Path) -> dict[str, Label]:
    """Labels from a JSON object (key → label), a `vpd-labels` file, or a CSV file with columns `node,label`.

    Keys may be component keys (`1.attn.q:31`) or canonical node ids (`comp/<module>/<c>@<t>`).

    Raises:
        VpdError: The file is missing, is not valid JSON/CSV, lacks the CSV columns, or has a bad key or label.
    """
    path = Path(path)
    if not path.is_file():
        raise VpdError(
            f"Label file {str(path)!r} does not exist; pass a JSON object of key → label or a CSV with columns "
            "node,label."
        )
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports would corrupt the header
    except UnicodeDecodeError:
        raise VpdError(f"Label file {str(path)!r} is not UTF-8 text; save it as UTF-8 JSON or CSV.") from None
    if path.suffix.lower() == ".json":
        return _read_json_labels(path, text)
    if path.suffix.lower() == ".csv":
        return _read_csv_labels(path, text)
    raise VpdError(f"Label file {str(path)!r} has suffix {path.suffix!r}; pass a .json or .csv file.")


def merge_labels(*labels: Mapping[str, str]) -> dict[str, str]:
    """One dict from several; where keys repeat, the later dict wins (e.g. harvest labels, then user labels)."""
    out: dict[str, str] = {}
    for one in labels:
        out.update(one)
    return out

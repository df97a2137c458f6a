"""Short labels for subcomponents: from a run's harvest statistics, or from a user's JSON or CSV file.

A label is keyed by either

- a component key, `{block}.{attn|mlp}.{short}:{c}` such as `1.attn.q:31`, which labels the
  subcomponent at every position, or
- a canonical node id such as `comp/model.layers.1.self_attn.q_proj/31@4`, which labels one node.

`label_for(labels, node)` looks a node up by its id first, then by its component key. The harvest
files are written by `circuits.harvest`; their names and format are defined in `attrgraph.harvest_format`.
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


def labels_for_run(run_dir: str | Path) -> dict[str, str]:
    """Component key → short label from a run's harvest and its `labels.json`, which wins; {} without either.

    Args:
        run_dir: A run folder holding `harvest/harvest.json`, or a harvest folder itself.

    Raises:
        ArtifactFormatError: The harvest has a format version this release cannot read.
    """
    labels: dict[str, str] = {}
    path = harvest_meta_path(run_dir)
    if path is not None:
        components = read_harvest_meta(path).get("components", {})
        labels = {key: summary_label(summary) for key, summary in components.items()}
    shipped = Path(run_dir) / RUN_LABELS
    if shipped.is_file():
        # A compact key → label file kept beside a run whose full harvest is too large to ship.
        labels.update(read_label_file(shipped))
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


def _read_json_labels(path: Path, text: str) -> dict[str, str]:
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
    out = {}
    for key, label in data.items():
        checked = _check_key(key, "the", path)
        if not isinstance(label, str):
            raise VpdError(f"Label file {str(path)!r}: the label of {key!r} is {label!r}; labels must be strings.")
        out[checked] = label
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
        out[_check_key(node, f"row {i}", path)] = label
    return out


def read_label_file(path: str | Path) -> dict[str, str]:
    """User labels from a JSON object (key → label) or a CSV file with columns `node,label`.

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

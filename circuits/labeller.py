"""Offline labels for subcomponents from their statistics; LLM labels are `circuits.autointerp` (`vpd autointerp`).

A `Labeller` turns one component summary (`Harvest.summary(flat, text=True)` or a card's `data`) into a short
label. `StatsLabeller` needs nothing but the statistics: `fires on ':' ';' '=' → writes 'o' ')'`
(`attrgraph.labels.summary_label`). `label_components` labels many subcomponents of a harvest with one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from attrgraph.labels import summary_label
from circuits.harvest import Harvest


class Labeller(Protocol):
    """Anything that labels one component summary."""

    def label(self, summary: Mapping[str, Any]) -> str: ...


class StatsLabeller:
    """Offline labels from the token statistics, e.g. `fires on ':' ';' '=' → writes 'o' ')'` (`summary_label`)."""

    def label(self, summary: Mapping[str, Any]) -> str:
        return summary_label(summary)


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

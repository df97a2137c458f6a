"""The harvest artifact, `<run>/harvest/`: its file names, format version, and the reading of its metadata.

`circuits.harvest` writes it and reads its tensors back; `attrgraph.labels` reads the summaries in
`harvest.json` to label graph nodes. The definition lives at this layer because both import it (this package
never imports `circuits`).

    harvest/                 written atomically as one directory
      harvest.safetensors    every count tensor of the pass
      harvest.json           format, format_version, settings, throughput, per-component summaries,
                             files {name: sha256} of the tensors file, checked when the tensors are read
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from decomposer.errors import ArtifactFormatError
from decomposer.io import resolve_atomic_dir

HARVEST_DIR = "harvest"
HARVEST_META = "harvest.json"
HARVEST_TENSORS = "harvest.safetensors"
HARVEST_FORMAT = "harvest"
HARVEST_FORMAT_VERSION = 1
HARVEST_DAMAGED_FIX = "run `vpd harvest` again"


def harvest_meta_path(folder: str | Path) -> Path | None:
    """`harvest.json` of a run folder (`<folder>/harvest/`) or of a harvest folder itself; None if there is none."""
    folder = Path(folder)
    if (folder / HARVEST_META).is_file():
        return folder / HARVEST_META
    found = resolve_atomic_dir(folder / HARVEST_DIR)
    if found is not None and (found / HARVEST_META).is_file():
        return found / HARVEST_META
    return None


def read_harvest_meta(path: str | Path) -> dict[str, Any]:
    """The contents of a `harvest.json`, with its format and version checked.

    Raises:
        ArtifactFormatError: The file is not a harvest, or has a version this release cannot read.
    """
    meta = json.loads(Path(path).read_text())
    if not isinstance(meta, dict) or meta.get("format") != HARVEST_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactFormatError(f"{path} has format {found!r}, not {HARVEST_FORMAT!r}; pass a harvest folder.")
    if meta.get("format_version") != HARVEST_FORMAT_VERSION:
        raise ArtifactFormatError(
            f"{path} has format_version {meta.get('format_version')!r}, but this release reads version "
            f"{HARVEST_FORMAT_VERSION}; upgrade the package or run `vpd harvest` again."
        )
    return meta

"""The resumable record of a labelling run: `<out>/autointerp/cache.jsonl`, one JSON line per finished request.

A line is appended and flushed as each reply is handled, so a run that is interrupted (Ctrl-C, a kill, a lost
connection) keeps everything it finished, and the next run with the same template and model asks only for the
rest. A line torn by a kill mid-write is skipped when read, and the next append starts on a fresh line.

    {"key": "1.attn.q:31", "template_version": "1", "template_sha": "…", "model": "…", "label": "…", "reply": "…"}
    {"key": …, "unclear": true, "reply": "unclear"}      a finished request whose answer is no label to show
    {"key": …, "error": "refused: I can't help with that"}   a failure, kept for the record; retried next run

A request is finished, and never sent again for the same (key, template version and text, model), when its line
has `label` or `unclear`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any


class LabelCache:
    """The finished requests in one cache file, and an appender for new ones (call `close` when done)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self.skipped_lines = 0
        self._file: IO[str] | None = None
        if self.path.is_file():
            with self.path.open("r", encoding="utf-8", errors="replace") as f:
                for line in f:
                    self._take(line)

    def _take(self, line: str) -> None:
        try:
            entry = json.loads(line)
        except ValueError:
            self.skipped_lines += int(bool(line.strip()))  # a line torn by a kill mid-write
            return
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(f), str) for f in ("key", "template_version", "template_sha", "model")
        ):
            self.skipped_lines += 1
            return
        if isinstance(entry.get("label"), str) or entry.get("unclear") is True:
            self.entries[_id(entry)] = entry

    def finished(self, key: str, template_version: str, template_sha: str, model: str) -> dict[str, Any] | None:
        """The finished entry for this request, or None."""
        return self.entries.get((key, template_version, template_sha, model))

    def labels(self, template_version: str, template_sha: str, model: str) -> dict[str, str]:
        """Key → label of every finished request of this template and model that gave a label."""
        return {
            k: e["label"]
            for (k, v, s, m), e in self.entries.items()
            if (v, s, m) == (template_version, template_sha, model) and isinstance(e.get("label"), str)
        }

    def append(self, entry: dict[str, Any]) -> None:
        """Write one line and flush it; an entry with `label` or `unclear` becomes finished."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = self.path.is_file() and self.path.stat().st_size > 0 and not _ends_with_newline(self.path)
            self._file = self.path.open("a", encoding="utf-8")
            if torn:
                self._file.write("\n")
        entry = {**entry, "time": round(time.time(), 3)}
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        if isinstance(entry.get("label"), str) or entry.get("unclear") is True:
            self.entries[_id(entry)] = entry

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _id(entry: dict[str, Any]) -> tuple[str, str, str, str]:
    return (entry["key"], entry["template_version"], entry["template_sha"], entry["model"])


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"

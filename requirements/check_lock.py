"""Fail with one sentence when a lock file and pyproject.toml disagree.

`make test` runs this before the suite. The locks are `uv pip compile` output, which annotates every pin
with the requirements that pulled it in (`# via ...`); a pin pulled in by `vpd-circuits (pyproject.toml)`
is a direct dependency. The lock agrees with pyproject when the direct pins are exactly pyproject's
requirements (the `dev` extra included for the dev lock) and every pin satisfies its range.

Usage: python requirements/check_lock.py requirements/lock.txt [--extra dev]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s\\;]+)")


def read_lock(path: Path) -> tuple[dict[str, Version], set[str]]:
    """(name → pinned version, names pulled in directly by the project) of a `uv pip compile` lock."""
    pins: dict[str, Version] = {}
    direct: set[str] = set()
    current = None
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            pins[current] = Version(match.group(2))
        elif current is not None and "vpd-circuits (pyproject.toml)" in line:
            direct.add(current)
    return pins, direct


def project_requirements(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in extras:
        specs += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(s) for s in specs]


def disagreement(lock: Path, extras: list[str]) -> str | None:
    """One sentence saying how the lock and pyproject disagree, or None when they agree."""
    if not lock.is_file():
        return f"The lock file {lock} is missing; run `make lock` to write it."
    pins, direct = read_lock(lock)
    fix = "run `make lock` and commit the lock with pyproject.toml"
    wanted = {canonicalize_name(r.name): r for r in project_requirements(extras)}
    for name, req in wanted.items():
        if name not in pins:
            return f"pyproject.toml requires {req}, but {lock.name} pins no {name}; {fix}."
        # A local build tag (torch 2.13.0+cpu) satisfies a range on its public version.
        if not req.specifier.contains(Version(pins[name].public), prereleases=True):
            return f"pyproject.toml requires {req}, but {lock.name} pins {name}=={pins[name]}; {fix}."
    stale = sorted(direct - set(wanted))
    if stale:
        return f"{lock.name} pins {', '.join(stale)} for the project, which pyproject.toml no longer requires; {fix}."
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--extra", action="append", default=[])
    args = parser.parse_args()
    problem = disagreement(args.lock, args.extra)
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The lock check that `make test` runs: it agrees with today's files and names each kind of disagreement."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "requirements" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("lock", "extras"), [("lock.txt", []), ("lock-dev.txt", ["dev"])])
def test_the_committed_locks_agree_with_pyproject(check, lock, extras):
    assert check.disagreement(ROOT / "requirements" / lock, extras) is None


def _lock_with(tmp_path: Path, check, replace: dict[str, str]) -> Path:
    text = (ROOT / "requirements" / "lock.txt").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "lock.txt"
    path.write_text(text)
    return path


def test_a_pin_outside_pyprojects_range_is_one_sentence(check, tmp_path):
    pins, _ = check.read_lock(ROOT / "requirements" / "lock.txt")
    path = _lock_with(tmp_path, check, {f"\ntransformers=={pins['transformers']} ": "\ntransformers==4.40.0 "})
    problem = check.disagreement(path, [])
    assert problem.startswith("pyproject.toml requires transformers>=") and "4.40.0" in problem
    assert problem.endswith("run `make lock` and commit the lock with pyproject.toml.")


def test_a_missing_pin_and_a_stale_pin_are_reported(check, tmp_path):
    pins, direct = check.read_lock(ROOT / "requirements" / "lock.txt")
    assert {"torch", "transformers", "networkx", "safetensors"} <= direct
    assert str(pins["torch"]).endswith("+cpu")  # the CPU build, which still satisfies torch's range
    missing = _lock_with(tmp_path, check, {f"\npyvis=={pins['pyvis']} ": "\nnot-pyvis==1.0 "})
    assert "pins no pyvis" in check.disagreement(missing, [])
    extra = tmp_path / "extra.txt"
    extra.write_text(missing.read_text() + "\nleftover==1.0 \\\n    # via vpd-circuits (pyproject.toml)\n")
    text = extra.read_text().replace("not-pyvis==1.0", f"pyvis=={pins['pyvis']}")
    extra.write_text(text)
    assert "leftover" in check.disagreement(extra, []) and "no longer requires" in check.disagreement(extra, [])
    assert "is missing" in check.disagreement(tmp_path / "nothing.txt", [])

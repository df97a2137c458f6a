"""`decomposer` and `circuits` are also names of unrelated PyPI projects: imports must be ours."""

import importlib
from importlib import metadata
from pathlib import Path

import pytest


@pytest.mark.parametrize("name", ["decomposer", "attrgraph", "circuits"])
def test_top_level_packages_resolve_to_this_distribution(name):
    module = importlib.import_module(name)
    here = Path(__file__).resolve().parent.parent
    assert Path(module.__file__).resolve().parent == here / name
    dist_files = {str(f) for f in metadata.files("vpd-circuits") or ()}
    # An editable install records a path hook instead of the files; a wheel install lists them.
    assert any(name in f or "__editable__" in f for f in dist_files)


def test_console_script_points_at_our_cli():
    (script,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "vpd"]
    assert script.value == "circuits.cli:main"
    assert script.dist.metadata["Name"] == "vpd-circuits"


def test_public_names_load_lazily():
    import subprocess
    import sys

    code = "import decomposer, sys; assert 'torch' not in sys.modules; decomposer.decompose; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr
    import decomposer

    for name in decomposer.__all__:
        assert getattr(decomposer, name) is not None

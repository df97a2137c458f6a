"""The three packages are layers: circuits → attrgraph → decomposer, never back, and no module import cycles.

Imports are read with `ast` from every module, those inside functions and `if TYPE_CHECKING:` blocks included:
a lazy import still ties the two modules together, and a cycle through one is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"decomposer": 0, "attrgraph": 1, "circuits": 2}
# Third-party packages a lower layer must not need: the graph tooling belongs to attrgraph and above.
FORBIDDEN_THIRD_PARTY = {"decomposer": {"networkx", "pyvis"}}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted name → file for every module of the layered packages under `root`."""
    return {
        module_name(root, path): path
        for package in LAYERS
        if (root / package).is_dir()
        for path in sorted((root / package).rglob("*.py"))
    }


def imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name `path` imports, relative imports resolved; `from a import b` yields a.b (module or name)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path) -> nx.DiGraph:
    """Module → module edges within the layered packages; each edge names the most specific module imported."""
    modules = package_modules(root)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in imported_names(name, path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # A module importing its own package's names (from . import x) is not an edge to itself.
            if target and target != name:
                graph.add_edge(name, target)
    return graph


def layer_violations(graph: nx.DiGraph) -> list[str]:
    """Imports from a lower layer into a higher one, as `importer -> imported`."""
    return sorted(f"{a} -> {b}" for a, b in graph.edges if LAYERS[a.partition(".")[0]] < LAYERS[b.partition(".")[0]])


def import_cycles(graph: nx.DiGraph) -> list[list[str]]:
    """The modules of each import cycle (strongly connected components of more than one module)."""
    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def third_party_violations(root: Path) -> list[str]:
    found = []
    for name, path in package_modules(root).items():
        forbidden = FORBIDDEN_THIRD_PARTY.get(name.partition(".")[0], set())
        found += [f"{name} -> {t}" for t in sorted(imported_names(name, path)) if t.partition(".")[0] in forbidden]
    return found


def test_no_import_goes_down_the_layers():
    graph = import_graph(ROOT)
    assert graph.number_of_edges() > 50, "the import graph looks empty; is the parser reading the packages?"
    assert layer_violations(graph) == []


def test_no_import_cycles():
    assert import_cycles(import_graph(ROOT)) == []


def test_lower_layers_need_no_graph_tooling():
    assert third_party_violations(ROOT) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def clean_tree(tmp_path):
    _write(
        tmp_path,
        {
            "decomposer/__init__.py": "",
            "decomposer/errors.py": "class VpdError(ValueError): ...\n",
            "decomposer/vpd/__init__.py": "",
            "decomposer/vpd/run.py": "from decomposer.errors import VpdError\nfrom ..errors import VpdError\n",
            "attrgraph/__init__.py": "from . import nodes\n",
            "attrgraph/nodes.py": "import decomposer.vpd.run\n",
            "circuits/__init__.py": "",
            "circuits/edit.py": "from attrgraph.nodes import x\nfrom decomposer.vpd import run\n",
        },
    )
    return tmp_path


def test_the_checks_pass_a_clean_tree_and_resolve_relative_imports(clean_tree):
    graph = import_graph(clean_tree)
    assert set(graph.successors("decomposer.vpd.run")) == {"decomposer.errors"}
    assert set(graph.successors("circuits.edit")) == {"attrgraph.nodes", "decomposer.vpd.run"}
    assert set(graph.successors("attrgraph")) == {"attrgraph.nodes"}
    assert layer_violations(graph) == [] and import_cycles(graph) == []
    assert third_party_violations(clean_tree) == []


@pytest.mark.parametrize(
    "planted, expected",
    [
        ("def f():\n    from circuits.edit import g\n", "decomposer.errors -> circuits.edit"),
        ("from attrgraph import nodes\n", "decomposer.errors -> attrgraph.nodes"),
        ("import typing\nif typing.TYPE_CHECKING:\n    import attrgraph\n", "decomposer.errors -> attrgraph"),
    ],
)
def test_a_planted_upward_import_is_reported(clean_tree, planted, expected):
    _write(clean_tree, {"decomposer/errors.py": planted})
    assert layer_violations(import_graph(clean_tree)) == [expected]


def test_a_planted_cycle_is_reported_even_through_a_lazy_import(clean_tree):
    _write(clean_tree, {"circuits/lora.py": "from circuits.edit import x\n"})
    _write(clean_tree, {"circuits/edit.py": "def f():\n    from circuits.lora import y\n"})
    assert import_cycles(import_graph(clean_tree)) == [["circuits.edit", "circuits.lora"]]


def test_a_planted_graph_library_in_decomposer_is_reported(clean_tree):
    _write(clean_tree, {"decomposer/vpd/run.py": "import networkx as nx\n"})
    assert third_party_violations(clean_tree) == ["decomposer.vpd.run -> networkx"]


def test_modules_import_shared_helpers_from_conftest_not_from_other_tests():
    borrowed = [
        f"{path.name} imports {name}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for name in imported_names(f"tests.{path.stem}", path)
        if name.startswith("tests.test_")
    ]
    assert borrowed == []

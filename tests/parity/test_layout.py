"""The package layout (README, Reading the code): imports go one way, weights <- torch_impl,
flax_impl <- parity <- tests; no module imports itself back through others (lazy imports inside
functions count too); `parity/` stays a handful of modules plus subpackages.

Read from the source with `ast`, so nothing is imported and the test costs milliseconds.
"""

from __future__ import annotations

import ast
import functools

from tests.helpers.configs import REPO_ROOT

PACKAGES = ("weights", "torch_impl", "flax_impl", "parity")
# What each package may import, besides itself (and the standard library and third parties).
ALLOWED = {"weights": set(), "torch_impl": {"weights"}, "flax_impl": {"weights"},
           "parity": {"weights", "torch_impl", "flax_impl"}}
MAX_PARITY_MODULES = 12


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(modules: dict) -> dict[str, set[str]]:
    """Module -> the modules of the tree it imports anywhere (TYPE_CHECKING blocks aside)."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                edges.add(module)
                edges.update(f"{module}.{a.name}" for a in node.names)
        # A module's own parent packages are already being imported: not an edge.
        graph[name] = {e for e in edges if e != name and not name.startswith(e + ".")}
    return graph


@functools.cache
def _tree():
    modules = {_module_name(p): p for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py")}
    return modules, _imports(modules)


def test_imports_go_one_way():
    modules, graph = _tree()
    for name, edges in graph.items():
        own = name.split(".")[0]
        for target in edges:
            top = target.split(".")[0]
            if top in PACKAGES and top != own:
                assert top in ALLOWED[own], f"{name} imports {target}"
            assert top != "tests", f"{name} imports {target}"


def test_no_import_circles():
    modules, all_edges = _tree()
    graph = {m: {e for e in edges if e in modules} for m, edges in all_edges.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_parity_is_a_handful_of_modules_plus_subpackages():
    top = sorted(p.name for p in (REPO_ROOT / "parity").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_PARITY_MODULES, top

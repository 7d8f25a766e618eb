"""The layers are a contract, not a habit: import-linter's contracts (pyproject.toml) hold, no import
circle joins the package's modules (imports inside functions count), and every import of a package
module inside a function is one that defers a heavy library, listed with why."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "redux_edge"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _deferred_imports() -> set[str]:
    """``importer -> imported`` for every import of a package module inside a function."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if node.module.split(".")[0] != "redux_edge":
                        continue
                    for alias in node.names:
                        full = f"{node.module}.{alias.name}"
                        found.add(f"{_module_name(path)} -> {full if _is_module(full) else node.module}")
                elif isinstance(node, ast.Import):
                    found |= {
                        f"{_module_name(path)} -> {alias.name}"
                        for alias in node.names
                        if alias.name.split(".")[0] == "redux_edge"
                    }
    return found


def test_the_import_contracts_hold():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "broken" in result.stdout and " 0 broken" in result.stdout


def test_every_import_inside_a_function_is_listed_with_the_library_it_defers():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["redux-edge"]["deferred-imports"]
    found = _deferred_imports()
    assert found - set(listed) == set(), "import it at the top, or list it (with why) in pyproject.toml"
    assert set(listed) - found == set(), "listed in pyproject.toml but no longer deferred: remove it"
    assert all(": " in reason for reason in listed.values())


def test_no_import_circle_joins_the_package_modules():
    graph = grimp.build_graph("redux_edge", exclude_type_checking_imports=True)
    edges = {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}
    # Tarjan's strongly connected components, iteratively: a component of two or more is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    assert circles == []

"""The layout's rules, checked on the source (every import, function-local ones included):

* ``scenarios/`` (schema, results format) and ``algorithms/`` (math) import no other project
  package, and ``algorithms/`` imports no Flower;
* ``clients/`` and ``edge/`` (the ClientApp side) never import ``server/``, and none of the apps
  imports the program's top, ``fedge/``;
* no import cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scenarios", "algorithms", "clients", "edge", "server", "fedge")
# package -> project packages it may import (besides itself)
ALLOWED = {
    "scenarios": set(),
    "algorithms": set(),
    "clients": {"scenarios", "algorithms", "edge"},
    "edge": {"scenarios", "algorithms", "clients"},
    "server": {"scenarios", "algorithms", "clients", "edge"},
    "fedge": {"scenarios", "algorithms", "clients", "edge", "server"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {
        mod: {m for m in imports_of(path) if m in files and m != mod} for mod, path in files.items()
    } | {"__external__": set()}


def external_imports(pkg: str) -> set[str]:
    return {m for p in (ROOT / pkg).rglob("*.py") for m in imports_of(p)}


def test_layers_only_look_down() -> None:
    graph = project_graph()
    bad = []
    for mod, deps in graph.items():
        pkg = mod.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != pkg and other not in ALLOWED.get(pkg, set()):
                bad.append(f"{mod} imports {dep}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_algorithms_import_no_flower() -> None:
    flower = sorted(m for m in external_imports("algorithms") if m.split(".")[0] == "flwr")
    assert not flower, f"algorithms/ must stay framework-free, imports {flower}"


def test_no_import_cycles() -> None:
    graph = project_graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)

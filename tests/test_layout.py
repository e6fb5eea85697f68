"""The code's layering: no import cycle under normsurgery/ (every import counted, those inside functions too; the
package's lazy top level aside), and nothing below the CLI imports the CLI or a command module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "normsurgery"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports() -> dict[str, set[str]]:
    """module -> the normsurgery modules it imports (a name imported from a package counts as its module)."""
    modules = _modules()

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {owner(a.name) for a in node.names if a.name.startswith("normsurgery")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("normsurgery"):
                edges |= {owner(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = edges - {name, "normsurgery"}
    return graph


def test_no_import_cycle():
    graph = _imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_nothing_below_the_cli_imports_it():
    entry = ("normsurgery.cli", "normsurgery.__main__")
    below = {m: e for m, e in _imports().items() if m not in entry and not m.startswith("normsurgery.commands")}
    offenders = {m: sorted(i for i in e if i == "normsurgery.cli" or i.startswith("normsurgery.commands"))
                 for m, e in below.items()}
    assert not {m: e for m, e in offenders.items() if e}

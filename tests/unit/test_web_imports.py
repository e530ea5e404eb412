"""server/web imports only downwards: no circle between its modules, not
even through ``if TYPE_CHECKING:`` (issue 11: metrics -> ops -> state ->
metrics went round through ``count_live_tasks``)."""

from __future__ import annotations

import ast
from pathlib import Path

import server.web

WEB = Path(server.web.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The sibling modules ``path`` imports (relative ``from .x import``)."""
    siblings = {module.stem for module in WEB.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found.update(name for name in names if name in siblings)
    return found - {path.stem}


def test_web_modules_import_without_circles() -> None:
    graph = {path.stem: imports_of(path) for path in WEB.glob("*.py")}
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, " -> ".join((*trail, module))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, (*trail, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())

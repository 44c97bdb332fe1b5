"""The x-nix-db family (guest_agent/nixdb/) imports one way: no circle, lazy and
type-only imports included (docs/design.md), and files at the bottom."""

from __future__ import annotations

import ast
from pathlib import Path

import guest_agent

PACKAGE = Path(guest_agent.__file__).parent


def _family_graph() -> dict[str, set[str]]:
    """module → the family modules it imports anywhere in its text (function bodies and
    `if TYPE_CHECKING:` blocks too)."""
    family = {p.stem: p for p in (PACKAGE / "nixdb").glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in family.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "guest_agent.nixdb":
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module.removeprefix("guest_agent.nixdb."))
            elif isinstance(node, ast.Import):
                deps.update(alias.name.removeprefix("guest_agent.nixdb.") for alias in node.names)
        graph[name] = {d for d in deps if d in family and d != name}
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of GRAPH (as a path that ends where it starts), or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for dep in sorted(graph[node]):
            found = visit(dep, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node, [])
        if found:
            return found
    return None


def test_the_nix_family_has_no_import_circle() -> None:
    graph = _family_graph()
    assert {"state", "files", "database", "record", "upper"} <= set(graph)
    assert _circle(graph) is None, " → ".join(_circle(graph) or [])


def test_nixfiles_is_the_bottom_and_nixstate_the_top() -> None:
    graph = _family_graph()
    assert graph["files"] == set()
    assert not any("state" in deps for deps in graph.values())


def test_a_circle_is_found() -> None:
    """The check above can fail: a type-only import back up is a circle."""
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert _circle({"a": {"b"}, "b": set()}) is None

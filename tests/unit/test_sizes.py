"""No module of guest_agent/ over ~300 lines, no class over ~250 (issue 23): a module one
reads whole, a class that does one job. A module over the line is named here with why,
and may not grow: the exception ends when it is split (the test then says to remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "guest_agent"
MODULE_LINES = 300
CLASS_LINES = 250

# module (path under guest_agent/) -> (the most lines it may have, why it is over the line):
# none since kernel/syscalls.py's mounting became kernel/mount.py.
OVER: dict[str, tuple[int, str]] = {}


def _sizes() -> tuple[dict[str, int], dict[str, int]]:
    modules, classes = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        modules[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text, name)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                classes[f"{name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return modules, classes


def size_failures(
    modules: dict[str, int], classes: dict[str, int], over: dict[str, tuple[int, str]]
) -> list[str]:
    failures = []
    for name, lines in modules.items():
        limit, _ = over.get(name, (MODULE_LINES, ""))
        if lines > limit:
            failures.append(f"{name} has {lines} lines, over {limit}: split it by job")
    failures += [
        f"{name} has {modules[name]} lines: it is no longer over, remove it from OVER"
        for name in over
        if name in modules and modules[name] <= MODULE_LINES
    ]
    failures += [f"{name} is in OVER but no module" for name in over if name not in modules]
    failures += [
        f"class {name} has {lines} lines, over {CLASS_LINES}: split it by job"
        for name, lines in classes.items()
        if lines > CLASS_LINES
    ]
    return failures


def test_no_module_and_no_class_is_over_its_size() -> None:
    failures = size_failures(*_sizes(), OVER)
    assert not failures, "\n".join(failures)


def test_a_module_or_class_over_its_size_is_named() -> None:
    modules = {"a.py": 301, "b.py": 320, "c.py": 200, "d.py": 340}
    over = {"b.py": (320, "why"), "c.py": (320, "why"), "d.py": (330, "why"), "e.py": (1, "")}
    assert size_failures(modules, {"a.py:Big": 251, "a.py:Small": 250}, over) == [
        "a.py has 301 lines, over 300: split it by job",
        "d.py has 340 lines, over 330: split it by job",
        "c.py has 200 lines: it is no longer over, remove it from OVER",
        "e.py is in OVER but no module",
        "class a.py:Big has 251 lines, over 250: split it by job",
    ]

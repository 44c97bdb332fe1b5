"""Every repository path and every guest_agent module the docs name exists: a move
(issue 23's packages) must carry the docs with it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
TOP = ("guest_agent", "tests", "bench", "tools", "initrd-hooks", "docs", ".ci")

# A repository path: one of the top directories, then path characters (globs allowed).
_TOPS = "|".join(re.escape(t) for t in TOP)
PATH = re.compile(rf"(?<![\w./-])((?:{_TOPS})/[\w./*+-]*[\w*])")
# A dotted module: guest_agent.x.y (an attribute after it is allowed: guest_agent.x.f);
# not a boot parameter (guest_agent.onfail=).
MODULE = re.compile(r"(?<![\w./-])guest_agent(?:\.\w+)+(?![\w=])")
# A relative markdown link to a file beside the page: [text](name.md#anchor).
LINK = re.compile(r"\]\(([\w./-]+?)(?:#[\w-]*)?\)")


def _exists(path: str) -> bool:
    if any(c in path for c in "*+"):
        return any(ROOT.glob(path))
    return (ROOT / path).exists()


def _is_module(base: Path) -> bool:
    """BASE (a path without .py) is a module or a package."""
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _module_exists(dotted: str) -> bool:
    """guest_agent.a.b names a module or package, or an attribute of one."""
    parts = dotted.split(".")
    while len(parts) > 1:
        if _is_module(ROOT.joinpath(*parts)):
            return True
        parts.pop()
    return False


def missing(page: Path) -> list[str]:
    text = page.read_text()
    found = []
    for m in PATH.finditer(text):
        path = m.group(1).rstrip(".")
        if not _exists(path):
            found.append(f"{page.name}: {path}")
    for m in MODULE.finditer(text):
        if not _module_exists(m.group(0)):
            found.append(f"{page.name}: {m.group(0)}")
    for m in LINK.finditer(text):
        target = m.group(1)
        if "://" in target or target.startswith(("http", "mailto")):
            continue
        if not (page.parent / target).exists():
            found.append(f"{page.name}: link {target}")
    return found


def test_the_docs_name_only_paths_and_modules_that_exist() -> None:
    problems = [p for page in DOCS for p in missing(page)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_path_a_module_and_a_link_that_do_not_exist(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "see `guest_agent/gone.py`, guest_agent.nowhere.f, [x](nothing.md) and "
        "`guest_agent/plan.py`, guest_agent.plan.in_rounds, `tests/unit/test_plan*.py`\n"
    )
    assert missing(page) == [
        "page.md: guest_agent/gone.py",
        "page.md: guest_agent.nowhere.f",
        "page.md: link nothing.md",
    ]


# --- the same for code outside the package: module names in strings move too -------------

# `from guest_agent[.x] import a, b as c`: in the code itself, or in a script in a string
# that runs elsewhere (a guest, a subprocess), which neither ruff nor an import checks.
FROM = re.compile(r"from (guest_agent(?:\.\w+)*) import ([\w ,]+)")
CODE = sorted(
    p
    for top in ("tests", "bench", "tools", "initrd-hooks")
    for p in (ROOT / top).rglob("*")
    if p.suffix in {".py", ".sh", ".nix", ""}
    and not {"vendor", "__pycache__"} & set(p.parts)
    and p.is_file()
)


def _top_names(module: str) -> set[str]:
    """The names a module's (or package's) top level defines, read with ast."""
    import ast

    base = ROOT.joinpath(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def stale(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        return []
    found = [f"{path.name}: {m.group(0)}" for m in MODULE.finditer(text)
             if not _module_exists(m.group(0)) and ".__" not in m.group(0)]  # fmt: skip
    for m in FROM.finditer(text):
        module = m.group(1)
        base = ROOT.joinpath(*module.split("."))
        if not _is_module(base):
            found.append(f"{path.name}: {m.group(0)}")
            continue
        for name in (n.split(" as ")[0].strip() for n in m.group(2).split(",")):
            if name and not _is_module(base / name) and name not in _top_names(module):
                found.append(f"{path.name}: {module} has no {name}")
    return found


def test_code_outside_the_package_names_only_modules_that_exist() -> None:
    # its own examples below, and the import graph's, which explain the words with `x`
    mine = {Path(__file__).resolve(), ROOT / "tests" / "unit" / "test_import_graph.py"}
    problems = [p for path in CODE if path not in mine for p in stale(path)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_a_moved_module_in_a_string(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(
        "RUN = 'import os; from guest_agent import syscalls as s; s.fsopen(\"x\")'\n"
        "from guest_agent.kernel import syscalls, gone\n"
        "from guest_agent.kernel.mount import MountError, Nothing\n"
        "X = 'guest_agent.mountlog.MountLog'\n"
    )
    assert stale(script) == [
        "probe.py: guest_agent.mountlog.MountLog",
        "probe.py: guest_agent has no syscalls",
        "probe.py: guest_agent.kernel has no gone",
        "probe.py: guest_agent.kernel.mount has no Nothing",
    ]

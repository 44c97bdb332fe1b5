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


def _module_exists(dotted: str) -> bool:
    """guest_agent.a.b names a module or package, or an attribute of one."""
    parts = dotted.split(".")
    while len(parts) > 1:
        base = ROOT.joinpath(*parts)
        if base.with_suffix(".py").exists() or (base / "__init__.py").exists():
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

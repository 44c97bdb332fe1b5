"""The import graph of guest_agent/ (issue 23): no circle, and the directions the layers keep.

The graph is read from the source with `ast`, nothing imported. Every import counts: at the
top, inside a function (a lazy import) and under `if TYPE_CHECKING:`, since each says that
one module needs another. `from guest_agent import x` imports guest_agent.x when x is a
module; a package's __init__ and its submodules are separate nodes (importing
guest_agent.handlers.base is not counted as importing guest_agent.handlers). Modules are
named without the `guest_agent.` prefix; the package itself is `guest_agent`.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "guest_agent"

# Circles known and being removed elsewhere (each entry the set of modules in one
# circle): none since the four of issue 23 were broken.
KNOWN_CIRCLES: set[frozenset[str]] = set()


def _node(dotted: str, package: str) -> str:
    return dotted if dotted == package else dotted.removeprefix(package + ".")


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Each module of the package at PACKAGE_DIR -> the modules of that package it imports."""
    package = package_dir.name
    files: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = (package, *path.relative_to(package_dir).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for dotted, path in files.items():
        is_package = path.name == "__init__.py"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one up per extra dot
                    base = dotted.split(".")[
                        : len(dotted.split(".")) - node.level + int(is_package)
                    ]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                for alias in node.names:  # `from P import m` imports the module P.m if there is one
                    sub = f"{module}.{alias.name}"
                    found.add(sub if sub in files else module)
        graph[_node(dotted, package)] = {
            _node(name, package) for name in found if name in files and name != dotted
        }
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. every set of
    modules that import one another round a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.add(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(frozenset(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found, key=sorted)


def one_cycle(graph: dict[str, set[str]], members: frozenset[str]) -> str:
    """A shortest way round the circle MEMBERS from its first module: `a → b → a`."""
    start = min(members)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                return " → ".join([*paths[node], start])
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError(f"{sorted(members)} is no circle")


def circle_failures(graph: dict[str, set[str]], known: set[frozenset[str]]) -> list[str]:
    found = circles(graph)
    failures = [
        f"import circle among {', '.join(sorted(c))}: {one_cycle(graph, c)}"
        for c in found
        if c not in known
    ]
    failures += [
        f"{sorted(c)} is no longer a circle: remove it from KNOWN_CIRCLES"
        for c in sorted(known - set(found), key=sorted)
    ]
    return failures


# --- the directions ------------------------------------------------------------------

DESIGN = ROOT / "docs" / "design.md"


def part_of(module: str) -> str:
    """The part of the map MODULE belongs to: its package, or itself at the top
    (`__main__` is main's: `python -m guest_agent`)."""
    if module == "guest_agent":
        return "__init__"
    return "main" if module == "__main__" else module.split(".")[0]


def read_map(text: str) -> dict[str, set[str]]:
    """docs/design.md's map: each part (a package or a top-level module, the first name
    of the table's first column without .py or /) -> the parts it may import."""
    section = text.split("\n## The map\n", 1)[1].split("\n## ", 1)[0]
    parts: dict[str, set[str]] = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            names, _job, allowed = (cell.strip() for cell in line.split("|")[1:-1])
            name = re.findall(r"`([^`]+)`", names)[0]
            parts[name.removesuffix(".py").removesuffix("/")] = {
                word.strip() for word in allowed.split(",") if word.strip()
            }
    return parts


def map_failures(graph: dict[str, set[str]], parts: dict[str, set[str]]) -> list[str]:
    """Every module in a part of the map, every part there, and each import one the map allows."""
    failures = [
        f"{module} is in no part of the map: add its package or module to docs/design.md"
        for module in sorted(graph)
        if part_of(module) not in parts
    ]
    present = {part_of(module) for module in graph}
    failures += [
        f"the map names {part}, which is no module" for part in sorted(parts.keys() - present)
    ]
    failures += [
        f"the map lets {part} import {sorted(allowed - parts.keys())}, which are not in it"
        for part, allowed in sorted(parts.items())
        if allowed - parts.keys()
    ]
    failures += [
        f"the map goes round: {one_cycle(parts, circle)}" for circle in circles(_closed(parts))
    ]
    for source in sorted(graph):
        for target in sorted(graph[source]):
            here, there = part_of(source), part_of(target)
            if here != there and here in parts and there not in parts[here]:
                allowed = ", ".join(sorted(parts[here])) or "nothing"
                failures.append(
                    f"{source} imports {target}: the map lets {here} import only {allowed}"
                )
    return failures


def _closed(parts: dict[str, set[str]]) -> dict[str, set[str]]:
    return {part: allowed & parts.keys() for part, allowed in parts.items()}


class Rule(NamedTuple):
    """Modules matching SOURCES import only modules matching ALLOWED (fnmatch patterns);
    with imported_by set, modules matching SOURCES are imported only by those matching ALLOWED.
    The map says which parts may meet; these say more inside a part."""

    sources: tuple[str, ...]
    allowed: tuple[str, ...]
    reason: str
    imported_by: bool = False


PARSING = ("config.parsers", "config.timespan", "config.from_json")

RULES = (
    Rule(
        PARSING,
        (*PARSING, "spec", "records"),
        "parsing is pure and total; config.merge, which merges the sources, sits above it",
    ),
    Rule(
        ("kernel.syscalls_legacy",),
        (),
        "mount(2) and umount2(2) are a leaf: kernel.mount falls back to it, never the other way",
    ),
    Rule(("nixdb.files",), (), "the x-nix-db files' names and errors: the bottom of nixdb"),
    Rule(
        ("nixdb.state",),
        ("handlers.*", "cli.*"),
        "a boot's reconcile is the top of nixdb: what it runs never calls back",
        imported_by=True,
    ),
)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)


def rule_failures(graph: dict[str, set[str]], rules: tuple[Rule, ...]) -> list[str]:
    failures = []
    for rule in rules:
        if not any(_matches(name, rule.sources) for name in graph):
            failures.append(f"rule for {rule.sources} names no module: update it")
        for source in sorted(graph):
            for target in sorted(graph[source]):
                if rule.imported_by:
                    wrong = _matches(target, rule.sources) and not _matches(source, rule.allowed)
                else:
                    wrong = _matches(source, rule.sources) and not _matches(target, rule.allowed)
                if wrong:
                    failures.append(f"{source} imports {target}, against: {rule.reason}")
    return failures


# --- the tests ------------------------------------------------------------------------


def test_no_import_circle() -> None:
    failures = circle_failures(import_graph(PACKAGE), KNOWN_CIRCLES)
    assert not failures, "\n".join(failures)


def test_every_import_is_one_the_map_in_docs_design_md_allows() -> None:
    failures = map_failures(import_graph(PACKAGE), read_map(DESIGN.read_text()))
    assert not failures, "\n".join(failures)


def test_inside_the_packages_the_finer_rules_hold() -> None:
    failures = rule_failures(import_graph(PACKAGE), RULES)
    assert not failures, "\n".join(failures)


def test_each_package_says_what_it_may_import_as_the_map_does() -> None:
    parts = read_map(DESIGN.read_text())
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert {"cli", "config", "devices", "handlers", "kernel", "kmod", "nixdb"} <= set(packages)
    for package in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
        said = re.search(r"^May import: (.*?)\.$", doc, re.M | re.S)
        assert said, f"guest_agent/{package}/__init__.py does not say what it may import"
        assert {w.strip() for w in said[1].split(",")} == parts[package], package


def test_the_map_is_read_from_its_table() -> None:
    text = (
        "\n## The map\n\n| part | job | may import |\n|---|---|---|\n"
        "| `main.py`, `__main__.py` | entry | cli |\n| `cli/` | edge | kernel, spec |\n"
        "| `kernel/` | kernel | spec |\n| `spec.py` | specs | |\n\n## Next\n| `x` | y | z |\n"
    )
    parts = read_map(text)
    assert parts == {
        "main": {"cli"}, "cli": {"kernel", "spec"}, "kernel": {"spec"}, "spec": set()
    }  # fmt: skip
    graph = {
        "main": {"cli"}, "__main__": {"main"}, "cli": {"kernel.syscalls", "plan"},
        "kernel.syscalls": {"spec"}, "spec": set(), "plan": set(),
    }  # fmt: skip
    assert map_failures(graph, parts) == [
        "plan is in no part of the map: add its package or module to docs/design.md",
        "cli imports plan: the map lets cli import only kernel, spec",
    ]
    parts["spec"] = {"main"}
    assert "the map goes round: cli → spec → main → cli" in map_failures(graph, parts)


def test_the_graph_counts_every_kind_of_import() -> None:
    graph = import_graph(PACKAGE)  # the synthetic package below tries each kind alone
    assert "config.parsers" in graph["config.merge"]  # at the top
    assert "config.from_json" in graph["config.merge"]  # inside a function
    assert "config.switches" in graph["config.merge"]  # `from guest_agent.config import switches`
    assert "report" in graph["config.inputs"]  # only under `if TYPE_CHECKING:`
    assert {"guest_agent", "cli", "cli.status"} <= graph.keys()  # packages are nodes


def _write(base: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    return base / "pkg"


def test_a_circle_of_lazy_type_checking_and_relative_imports_is_named(tmp_path: Path) -> None:
    package = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "def f():\n    from pkg import b\n",
            "pkg/b.py": "TYPE_CHECKING = False\nif TYPE_CHECKING:\n    from pkg.sub.c import X\n",
            "pkg/sub/__init__.py": "from .c import X\n",
            "pkg/sub/c.py": "from .. import a\nfrom . import d\nimport os\n",
            "pkg/sub/d.py": "",
            "pkg/e.py": "from pkg.sub import d\nimport pkg.a\n",
        },
    )
    graph = import_graph(package)
    assert graph == {
        "pkg": set(),
        "a": {"b"},
        "b": {"sub.c"},
        "sub": {"sub.c"},
        "sub.c": {"a", "sub.d"},
        "sub.d": set(),
        "e": {"sub.d", "a"},
    }
    assert circle_failures(graph, set()) == ["import circle among a, b, sub.c: a → b → sub.c → a"]
    assert circle_failures(graph, {frozenset({"a", "b", "sub.c"}), frozenset({"d", "e"})}) == [
        "['d', 'e'] is no longer a circle: remove it from KNOWN_CIRCLES"
    ]


def test_an_import_against_a_rule_is_named() -> None:
    graph = {"config.parsers": {"spec", "kernel.paths"}, "spec": set(), "kernel.paths": set()}
    assert rule_failures(graph, RULES[:1]) == [
        f"config.parsers imports kernel.paths, against: {RULES[0].reason}"
    ]
    graph = {"nixdb.state": set(), "nixdb.upper": {"nixdb.state"}, "cli.status": {"nixdb.state"}}
    assert rule_failures(graph, RULES[3:4]) == [
        f"nixdb.upper imports nixdb.state, against: {RULES[3].reason}"
    ]


# --- what a boot imports ----------------------------------------------------------------

ONLY_WHEN_USED = {
    "guest_agent.config.from_json",
    "guest_agent.kernel.syscalls_legacy",
    "guest_agent.config.timespan",
}


def _boot_imports(tmp_path: Path, cmdline: str, *extra: str) -> set[str]:
    (tmp_path / "cmdline").write_text(cmdline)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "guest_agent", "mount-all", "--dry-run",
         "--root", str(tmp_path), "--cmdline", str(tmp_path / "cmdline"), *extra],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}


def test_a_plain_boot_imports_neither_the_json_reader_nor_the_time_spans(tmp_path: Path) -> None:
    default = "/etc/guest-agent/mounts.json"  # read when no --config is given
    assert not os.path.exists(default), f"{default} exists here: run this test without it"
    spec = "microvm.share=data:/data microvm.volume=tmpfs:/x:tmpfs:x-device-timeout=5\n"
    plain = _boot_imports(tmp_path, spec)
    assert {
        "guest_agent.config.merge",
        "guest_agent.config.parsers",
        "guest_agent.kernel.syscalls",
    } <= plain
    assert not plain & ONLY_WHEN_USED, sorted(plain & ONLY_WHEN_USED)
    # and the two are imported when a file is given and a time span has units
    (tmp_path / "c.json").write_text('{"shares": [{"tag": "t", "mountPoint": "/t"}]}')
    used = _boot_imports(
        tmp_path, spec.replace("=5", "=1min"), "--config", str(tmp_path / "c.json")
    )
    assert used & ONLY_WHEN_USED == {"guest_agent.config.from_json", "guest_agent.config.timespan"}

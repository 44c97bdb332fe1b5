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

KERNEL = ("kernel", "kernel.*", "devices.sysfs", "devices.uevent")
CLI = ("__main__", "main", "cli", "cli.*")
PARSING = ("config.parsers", "config.timespan", "config.from_json")


class Rule(NamedTuple):
    """Modules matching SOURCES import only modules matching ALLOWED (fnmatch patterns);
    with imported_by set, modules matching SOURCES are imported only by those matching ALLOWED."""

    sources: tuple[str, ...]
    allowed: tuple[str, ...]
    reason: str
    imported_by: bool = False


RULES = (
    Rule(("records",), (), "the record type every layer builds on: it needs nothing"),
    Rule(("spec",), ("records",), "specs are plain values, shared by every layer"),
    Rule(
        PARSING,
        (*PARSING, "spec", "records"),
        "parsing is pure and total; config, which merges the sources, sits above it",
    ),
    Rule(
        KERNEL,
        (*KERNEL, "spec", "records"),
        "the kernel interface knows no policy: no config, plan, handlers, runner or CLI",
    ),
    Rule(("plan",), ("spec", "records"), "planning is pure: made and tested without root"),
    Rule(
        ("handlers", "handlers.*"),
        ("handlers", "handlers.*", "runner", "cli.*"),
        "the handlers are the top of execution: what they use never calls back",
        imported_by=True,
    ),
    Rule(CLI, CLI, "problems become lines and exit codes only at the CLI edge", imported_by=True),
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


def test_the_layers_import_in_one_direction() -> None:
    failures = rule_failures(import_graph(PACKAGE), RULES)
    assert not failures, "\n".join(failures)


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
    graph = {
        "kernel.syscalls": {"records", "plan"}, "plan": {"spec"}, "records": set(), "spec": set()
    }  # fmt: skip
    rules = RULES[3:5]  # the kernel interface's and the plan's
    assert rule_failures(graph, rules) == [
        f"kernel.syscalls imports plan, against: {RULES[3].reason}"
    ]
    graph = {"handlers.base": set(), "devices.discovery": {"handlers.base"}, "runner": {"handlers.base"}}
    assert rule_failures(graph, RULES[5:6]) == [
        f"devices.discovery imports handlers.base, against: {RULES[5].reason}"
    ]


# --- what a boot imports ----------------------------------------------------------------

ONLY_WHEN_USED = {"guest_agent.config.from_json", "guest_agent.kernel.syscalls_legacy", "guest_agent.config.timespan"}


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
    assert {"guest_agent.config.merge", "guest_agent.config.parsers", "guest_agent.kernel.syscalls"} <= plain
    assert not plain & ONLY_WHEN_USED, sorted(plain & ONLY_WHEN_USED)
    # and the two are imported when a file is given and a time span has units
    (tmp_path / "c.json").write_text('{"shares": [{"tag": "t", "mountPoint": "/t"}]}')
    used = _boot_imports(
        tmp_path, spec.replace("=5", "=1min"), "--config", str(tmp_path / "c.json")
    )
    assert used & ONLY_WHEN_USED == {"guest_agent.config.from_json", "guest_agent.config.timespan"}

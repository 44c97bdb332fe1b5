"""The demo (`./demo` runs tools/demo.py after the test bed's set-up) shows the caveat solved.

Runs tools/demo.py as a user would, for each kernel, and reads its printed output:
boot 1 builds two packages with real Nix in the guest (x-nix-db on), boot 2 (a reboot)
finds them valid, `nix-store --verify --check-contents` clean and a rebuild builds
nothing, boot 3 (the host rebuilt the lower) shows the agent's invalidation lines,
boot 4 (microvm.reset-overlay) an empty upper layer and a fresh database. The
assertions read the commands' own output, not the demo's "->" summaries.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import nixstores as ns
import pytest
import testbed as tb

pytestmark = pytest.mark.vm

DEMO = tb.REPO_ROOT / "tools" / "demo.py"
_BOOT = re.compile(r"^### boot (\d+)", re.M)
_COMMAND = re.compile(r"^\$ ([^\n]*)\n(.*?)^\(exit status (\d+)\)$", re.M | re.S)
_STORE_PATH = r"/nix/store/[0-9a-z]{32}-"


@dataclass(frozen=True)
class Boot:
    text: str
    agent: str  # the agent's lines at stage 1
    commands: list[ns.Step]  # name: the command line; output: what it printed

    def run(self, prefix: str) -> ns.Step:
        found = [c for c in self.commands if c.name.startswith(prefix)]
        assert len(found) == 1, (prefix, self.text)
        return found[0]


def parse(out: str) -> dict[int, Boot]:
    parts = _BOOT.split(out)
    boots = {}
    for number, text in zip(parts[1::2], parts[2::2], strict=True):
        agent = text.split("=== stage 1: guest-agent mount-all ===\n", 1)[-1]
        agent = agent.split("\n(exit status", 1)[0]
        commands = [
            ns.Step(
                m.group(1),
                "" if m.group(2) == "(no output)\n" else m.group(2),
                int(m.group(3)),
                None,
            )
            for m in _COMMAND.finditer(text)
        ]
        boots[int(number)] = Boot(text, agent, commands)
    return boots


def paths_named(step: ns.Step, name: str) -> list[str]:
    return [x for x in step.lines if re.fullmatch(_STORE_PATH + re.escape(name), x)]


def check_demo_output(out: str) -> None:
    """What a user of ./demo must see; raises AssertionError with the output."""
    boots = parse(out)
    assert sorted(boots) == [1, 2, 3, 4], out
    assert re.search(
        r"^kernel command line: .*microvm\.store-overlay=\S+:x-nix-db regInfo=", out, re.M
    ), out

    # Boot 1: the agent registers the lower closure; real nix-build builds both packages.
    first = boots[1]
    assert "Nix database: 3 valid paths, 3 registered now" in first.agent, first.text
    build = first.run("nix-build")
    assert build.rc == 0, first.text
    for name in ("demo-app-1.0", "demo-tool-1.0"):
        assert re.search(rf"^building '{_STORE_PATH}{name}\.drv'", build.output, re.M), first.text
    (app,), (tool,) = paths_named(build, "demo-app-1.0"), paths_named(build, "demo-tool-1.0")

    # Boot 2: a reboot: both valid, the rebuild builds nothing, verify clean.
    second = boots[2]
    valid = second.run("nix-store --check-validity")
    assert valid.rc == 0 and valid.output == "", second.text
    rebuild = second.run("nix-build")
    assert rebuild.rc == 0 and rebuild.lines == [app, tool], second.text  # no "building" line
    assert ns.judge_verify(second.run("nix-store --verify --check-contents")).clean, second.text

    # Boot 3: the host dropped nb-dep: the agent invalidates it and demo-app (and its .drv).
    third = boots[3]
    gone = re.search(r"^invalidated 1 store paths no longer in the store: (.*)$", third.agent, re.M)
    assert gone and re.fullmatch(r"[0-9a-z]{32}-nb-dep-1\.0", gone.group(1)), third.text
    dependents = re.search(
        r"^invalidated 2 store paths whose dependencies left the lower store: (.*)$",
        third.agent,
        re.M,
    )
    assert dependents and app.removeprefix("/nix/store/") in dependents.group(1), third.text
    assert "demo-app-1.0.drv" in dependents.group(1), third.text
    assert "Nix database: 5 valid paths, 1 registered now" in third.agent, third.text
    valid = third.run("nix-store --check-validity")
    assert valid.rc == 0 and valid.lines == [app], third.text  # demo-tool and nb-new valid
    assert ns.judge_verify(third.run("nix-store --verify --check-contents")).clean, third.text

    # Boot 4: the reset: the upper layer empty, a fresh database with the lower only.
    fourth = boots[4]
    assert re.search(r"^kernel command line: .*microvm\.reset-overlay$", fourth.text, re.M), (
        fourth.text
    )
    assert "reset the /nix/store upper layer" in fourth.agent, fourth.text
    upper = fourth.run("ls -A /nix/.rw-store/store")
    assert upper.rc == 0 and upper.output == "", fourth.text
    valid = fourth.run("nix-store --check-validity")
    assert valid.rc == 0 and valid.lines == [app, tool], fourth.text
    assert "Nix database: 3 valid paths, 3 registered now" in fourth.agent, fourth.text

    assert re.search(r"^demo finished$", out, re.M) and "demo FAILED" not in out, out


def _in_boot(number: int, old: str, new: str) -> Callable[[str], str]:
    def mutate(out: str) -> str:
        head, sep, tail = out.partition(f"### boot {number}")
        return head + sep + tail.replace(old, new, 1)

    return mutate


#: Lies the checks must refuse: a rebuild after the reboot, a dirty verify, no invalidation
#: line, an upper layer kept by the reset.
MUTATIONS: dict[str, Callable[[str], str]] = {
    "boot 2 rebuilds": _in_boot(
        2,
        "$ nix-build --no-out-link /demo/default.nix\n",
        "$ nix-build --no-out-link /demo/default.nix\n"
        "building '/nix/store/2iwxx9icg0fap6b9jrri70s5zssdcikw-demo-app-1.0.drv'...\n",
    ),
    "boot 2 verify removes a path": _in_boot(
        2,
        "checking store hashes...\n",
        "checking store hashes...\npath '/nix/store/x' disappeared, removing from database...\n",
    ),
    "boot 3 has no invalidation": _in_boot(3, "invalidated 1 store paths", "dropped 1 store paths"),
    "boot 4 upper not empty": _in_boot(
        4, "$ ls -A /nix/.rw-store/store\n(no output)", "$ ls -A /nix/.rw-store/store\nx"
    ),
}


def test_the_demo_shows_the_caveat_solved(testbed: tb.Testbed, kernel: str) -> None:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(DEMO), "--kernel", kernel],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    print(f"demo on Linux {kernel}: {time.monotonic() - start:.0f}s\n{done.stdout}")
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    check_demo_output(done.stdout)
    for what, mutate in MUTATIONS.items():  # the checks can fail: each lie is caught
        lie = mutate(done.stdout)
        assert lie != done.stdout, what
        with pytest.raises(AssertionError):
            check_demo_output(lie)

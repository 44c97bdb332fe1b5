"""The boot switches' shell function, generated from guest_agent/config/switches.py.

Every target reads the switches with the one function tools/switches_shell.py
writes into it: the checked-in blocks must be what the table generates, and
the function, run by the shells the targets use (busybox ash in initramfs-tools'
and NixOS's scripted stage 1, dash/bash elsewhere), must read every word of the
table as the table says, the last switch word winning. The status unit's
ExecCondition= is run as systemd would run it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guest_agent.config.switches import (
    DEPRECATED,
    FALSE_WORDS,
    ONFAIL_KEYS,
    ONFAIL_VALUES,
    SWITCH_KEYS,
    TRUE_WORDS,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import switches_shell  # noqa: E402

SHELLS = [("busybox", "sh"), ("dash",), ("bash", "--posix")]
OLD_SWITCH_KEYS = [old for old, new in DEPRECATED.items() if new in SWITCH_KEYS]
OLD_ONFAIL_KEYS = [old for old, new in DEPRECATED.items() if new in ONFAIL_KEYS]
ALL_SWITCH_KEYS = [*SWITCH_KEYS, *OLD_SWITCH_KEYS]
ALL_ONFAIL_KEYS = [*ONFAIL_KEYS, *OLD_ONFAIL_KEYS]


@pytest.mark.parametrize("path", list(switches_shell.TARGETS), ids=lambda p: p.name)
def test_checked_in_block_is_what_the_table_generates(path: Path) -> None:
    assert path.read_text() == switches_shell.generated(path), (
        f"{path.relative_to(REPO)} is out of date: run tools/switches_shell.py"
    )


def test_check_mode_names_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = next(iter(switches_shell.TARGETS))
    stale = tmp_path / target.name
    stale.write_text(target.read_text().replace("rd.guest-agent=off", "rd.guest-agent=of", 1))
    monkeypatch.setattr(switches_shell, "REPO", tmp_path)
    monkeypatch.setattr(switches_shell, "TARGETS", {stale: switches_shell.TARGETS[target]})
    assert switches_shell.main(["--check"]) == 1
    assert switches_shell.main([]) == 0
    assert stale.read_text() == target.read_text()


def function_text() -> str:
    return "\n".join(switches_shell.function_lines()) + "\n"


def read_switches(shell: tuple[str, ...], words: list[str], onfail: str = "continue") -> list[str]:
    """[GUEST_AGENT_OFF, GUEST_AGENT_ONFAIL, the lines printed...] after reading words."""
    if shutil.which(shell[0]) is None:
        pytest.fail(f"{shell[0]} is missing (run `sudo tools/setup-testbed`)", pytrace=False)
    script = (
        function_text()
        + f"GUEST_AGENT_OFF=; GUEST_AGENT_ONFAIL={onfail}\n"
        + 'guest_agent_switches "$@"\n'
        + 'echo "$GUEST_AGENT_OFF"; echo "$GUEST_AGENT_ONFAIL"\n'
    )
    done = subprocess.run(
        [*shell, "-c", script, "sh", *words], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stderr == "", done
    *printed, off, onfail = done.stdout.split("\n")[:-1]
    return [off, onfail, *printed]


def expected(words: list[str], onfail: str = "continue") -> list[str]:
    """What the table says words mean: a model of the function, written apart from it."""
    off, notes = "", []
    for word in words:
        key, eq, value = word.partition("=")
        if key in ALL_SWITCH_KEYS and eq:
            if value in FALSE_WORDS:
                off = word
                if key in DEPRECATED:
                    off += f" (the old spelling of {DEPRECATED[key]}=, read until the next release)"
            elif value in TRUE_WORDS:
                off = ""
            else:
                notes.append(
                    f"guest-agent: {word} ignored: the switch takes {', '.join(FALSE_WORDS)}"
                    f" (off) or {', '.join(TRUE_WORDS)} (on)"
                )
        elif key in ALL_ONFAIL_KEYS and eq:
            if value in ONFAIL_VALUES:
                onfail = value
            else:
                notes.append(
                    f"guest-agent: {word} ignored: the failure switch takes continue or shell"
                )
    return [off, onfail, *notes]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_every_word_of_the_table(shell: tuple[str, ...]) -> None:
    for key in ALL_SWITCH_KEYS:
        for value in (*FALSE_WORDS, *TRUE_WORDS, "maybe", "", "OFF"):
            words = ["console=ttyS0", f"{key}={value}", "quiet"]
            assert read_switches(shell, words) == expected(words), words
            # after an off word: an on word turns it on again, an unknown one changes nothing
            words = ["guest-agent=0", f"{key}={value}"]
            assert read_switches(shell, words) == expected(words), words
    for key in ALL_ONFAIL_KEYS:
        for value in (*ONFAIL_VALUES, "panic", ""):
            words = [f"{key}={value}"]
            assert read_switches(shell, words, "shell") == expected(words, "shell"), words
            assert read_switches(shell, words) == expected(words), words


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
@pytest.mark.parametrize(
    ("words", "off", "onfail"),
    [
        # the last switch word wins, whichever key and spelling it has
        (["guest-agent=0", "rd.guest-agent=on"], "", "continue"),
        (["rd.guest-agent=on", "guest-agent=false"], "guest-agent=false", "continue"),
        (
            ["guest-agent=1", "rd.guest-agent=no", "guest-agent.onfail=shell"],
            "rd.guest-agent=no",
            "shell",
        ),
        (["guest-agent.onfail=shell", "rd.guest-agent.onfail=continue"], "", "continue"),
        (["rd.guest_agent.onfail=continue", "guest-agent.onfail=shell"], "", "shell"),
        (
            ["guest_agent=off"],
            "guest_agent=off (the old spelling of guest-agent=, read until the next release)",
            "continue",
        ),
        # words that only look like the switch
        (["guest-agent", "rd.guest-agent", "xguest-agent=0", "guest-agent.x=0"], "", "continue"),
        (["guest-agent.onfail=shell=1"], "", "continue"),
    ],
)
def test_last_word_wins(shell: tuple[str, ...], words: list[str], off: str, onfail: str) -> None:
    got = read_switches(shell, words)
    assert got[:2] == [off, onfail], words
    assert got == expected(words), words


def exec_condition(unit: Path) -> list[str]:
    """The ExecCondition= command line as systemd reads it: continuation lines
    joined, the words split and unquoted, $$ turned into $."""
    joined = unit.read_text().replace("\\\n", " ")
    line = next(x for x in joined.splitlines() if x.startswith("ExecCondition="))
    return [w.replace("$$", "$") for w in shlex.split(line.removeprefix("ExecCondition="))]


@pytest.mark.parametrize(
    ("cmdline", "rc", "out"),
    [
        ("console=ttyS0 quiet", 0, ""),
        ("guest-agent=off", 1, "guest-agent: off (guest-agent=off): not checking\n"),
        ("rd.guest-agent=false", 1, "guest-agent: off (rd.guest-agent=false): not checking\n"),
        ("guest-agent=0 rd.guest-agent=yes", 0, ""),
        ("rd.guest-agent=maybe", 0, "guest-agent: rd.guest-agent=maybe ignored: the switch takes"),
    ],
)
def test_status_unit_exec_condition(tmp_path: Path, cmdline: str, rc: int, out: str) -> None:
    """guest-agent-status.service: exit 1 (systemd: skipped) when the agent was off."""
    argv = exec_condition(REPO / "initrd-hooks" / "systemd" / "guest-agent-status.service")
    assert argv[:2] == ["/bin/sh", "-c"] and len(argv) == 3, argv
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    script = argv[2].replace("/proc/cmdline", str(tmp_path / "cmdline"))
    assert script != argv[2]
    for shell in ("dash", "bash"):
        done = subprocess.run([shell, "-c", script], capture_output=True, text=True, check=False)
        assert (done.returncode, done.stderr) == (rc, ""), done
        assert done.stdout.startswith(out) and bool(done.stdout) == bool(out), done.stdout

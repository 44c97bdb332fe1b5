"""docs/reference.md "Commands" and "JSON output" against the code's own tables, both ways:
every command, its example and its exit codes; every --json field and value. The page
is parsed (headings, tables, the indented example); the code is read, not copied."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guest_agent.cli import (
    JSON_KEYS,
    PROBLEM_FIELDS,
    USAGE,
    USAGE_EXIT,
    discover,
    mount_all,
    reset_overlay,
    status,
    status_overlay,
)
from guest_agent.cli import app as cli
from guest_agent.cli.record import RECORD_FIELDS
from guest_agent.results import MOUNT_FIELDS, Status

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
MODULES = {
    "mount-all": mount_all,
    "status": status,
    "discover": discover,
    "reset-overlay": reset_overlay,
}


def section(text: str, heading: str) -> str:
    """The body of `## HEADING` (up to the next `## `)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no '## {heading}' in {PAGE}"
    return match.group(1)


def subsections(body: str) -> dict[str, str]:
    parts = re.split(r"^### (.+)\n", body, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def tables(body: str) -> list[list[list[str]]]:
    """Each Markdown table of BODY: its rows (header and rule left out), cells stripped."""
    found: list[list[list[str]]] = []
    lines = body.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---") and i > 0 and lines[i - 1].startswith("|"):
            rows = []
            for row in lines[i + 1 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split(" | ")])
            found.append(rows)
    return found


def names(rows: list[list[str]]) -> list[str]:
    """The first column's `code` words."""
    out = []
    for row in rows:
        match = re.fullmatch(r"`([^`]+)`", row[0])
        assert match, f"{row[0]!r}: expected one `name` in the first column"
        out.append(match.group(1))
    return out


TEXT = PAGE.read_text()
COMMANDS = subsections(section(TEXT, "Commands"))
JSON = subsections(section(TEXT, "JSON output"))


def test_every_command_has_a_section_and_no_section_names_none() -> None:
    page = {re.fullmatch(r"`guest-agent (\S+)`", h).group(1) for h in COMMANDS}  # type: ignore[union-attr]
    assert page == set(cli.main.commands) == set(MODULES) == set(cli.EXAMPLES)


@pytest.mark.parametrize("command", sorted(MODULES))
def test_exit_codes_of_each_command(command: str) -> None:
    body = COMMANDS[f"`guest-agent {command}`"]
    (rows,) = tables(body)
    page = {int(code): meaning for code, meaning in rows}
    assert page == {**MODULES[command].EXIT_CODES, USAGE_EXIT: USAGE}


@pytest.mark.parametrize("command", sorted(MODULES))
def test_example_of_each_command_is_the_one_help_shows(command: str) -> None:
    body = COMMANDS[f"`guest-agent {command}`"]
    examples = re.findall(r"^ {4}(guest-agent .+)$", body, re.M)
    assert examples == [cli.EXAMPLES[command]]
    helped = cli.main.commands[command].epilog or ""
    assert cli.EXAMPLES[command] in helped and cli.REFERENCE in helped


def test_top_level_fields() -> None:
    lists = {m.JSON_LIST for m in (mount_all, status, discover)}
    expected = [k for k in JSON_KEYS if k != "LIST"] + sorted(lists) + list(status.EXTRA_KEYS)
    (rows,) = tables(JSON["Top level"])
    assert sorted(names(rows)) == sorted(expected)


@pytest.mark.parametrize(
    ("heading", "fields"),
    [
        ("Problems", PROBLEM_FIELDS),
        ("The boot record", RECORD_FIELDS),
        ("`mount-all`: `mounts`", MOUNT_FIELDS),
        ("`status`: `mounts`", status.STATUS_FIELDS),
        ("`discover`: `devices`", discover.DEVICE_FIELDS),
    ],
)
def test_fields_of_each_list(heading: str, fields: tuple[str, ...]) -> None:
    assert names(tables(JSON[heading])[0]) == list(fields)


def test_values_and_layers() -> None:
    _, mount_statuses = tables(JSON["`mount-all`: `mounts`"])
    assert names(mount_statuses) == list(Status.ALL)
    _, states, layer, checks = tables(JSON["`status`: `mounts`"])
    assert names(states) == list(status.State.ALL)
    assert names(layer) == list(status_overlay.LAYER_FIELDS)
    assert names(checks) == list(status_overlay.Check.ALL)
    layers_row = next(r for r in tables(JSON["`status`: `mounts`"])[0] if r[0] == "`layers`")
    assert re.findall(r"`(\w+)`", layers_row[2]) == list(status_overlay.LAYER_NAMES)


def test_the_parsers_of_this_test_see_a_difference() -> None:
    """The page parsed with a field dropped and one added must not pass."""
    body = JSON["Problems"].replace("| `hint` |", "| `hints` |")
    assert names(tables(body)[0]) != list(PROBLEM_FIELDS)

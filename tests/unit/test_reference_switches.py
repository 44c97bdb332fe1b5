"""docs/reference.md's Switches table against guest_agent/config/switches.py, both ways.

Every switch word the code reads has a row with exactly its values (the old
spellings marked deprecated, naming the new one), and every row is a word the
code reads.
"""

from __future__ import annotations

import re
from pathlib import Path

from guest_agent.config.switches import (
    DEPRECATED,
    FALSE_WORDS,
    ONFAIL_KEYS,
    ONFAIL_VALUES,
    SWITCH_KEYS,
    TRUE_WORDS,
)

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = re.search(r"\n#{2,3} ", text[start + len(heading) + 2 :])
    return text[start : start + len(heading) + 2 + end.start()] if end else text[start:]


def rows() -> dict[str, tuple[str, str]]:
    """Switches table: word (without its `=`) -> (values cell, meaning cell)."""
    table: dict[str, tuple[str, str]] = {}
    for line in section(REFERENCE.read_text(), "### Switches").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 3 or not cells[0].startswith("`"):
            continue
        word = cells[0].strip("`")
        assert word.endswith("="), line
        assert word[:-1] not in table, f"{word} twice"
        table[word[:-1]] = (cells[1], cells[2])
    return table


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def test_every_word_the_code_reads_has_a_row_and_every_row_is_read() -> None:
    assert set(rows()) == {*SWITCH_KEYS, *ONFAIL_KEYS, *DEPRECATED}


def test_switch_values() -> None:
    table = rows()
    for key in SWITCH_KEYS:
        values, _ = table[key]
        off, on = values.split(";")
        assert off.strip().startswith("off:") and on.strip().startswith("on:"), values
        assert ticked(off) == list(FALSE_WORDS), values
        assert ticked(on) == list(TRUE_WORDS), values
    for key in ONFAIL_KEYS:
        values, _ = table[key]
        assert ticked(values) == list(ONFAIL_VALUES), values


def test_old_spellings_are_marked_deprecated_with_the_new_one() -> None:
    table = rows()
    for key, (values, meaning) in table.items():
        if key in DEPRECATED:
            new = DEPRECATED[key]
            assert values == f"as `{new}=`", (key, values)
            assert meaning.startswith("**deprecated**"), (key, meaning)
            assert f"`{new}=`" in meaning, (key, meaning)
        else:
            assert "deprecated" not in meaning.lower(), (key, meaning)

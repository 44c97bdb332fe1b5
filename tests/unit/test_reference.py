"""docs/reference.md and the parsers' own tables say the same (issue 21, item 4), both ways:
a word in the code and not on the page fails, and so does a word on the page and not in
the code. Sections: "Boot parameters" (not its "Switches"), "JSON config", "Option words"."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_agent import spec
from guest_agent.config import from_json as config_json
from guest_agent.config import merge as config

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def section(title: str, stop_at_subsection: bool = False) -> str:
    """The text of `## TITLE`, up to the next `## ` (or `### ` when STOP_AT_SUBSECTION)."""
    lines = PAGE.read_text().splitlines()
    start = lines.index(f"## {title}") + 1
    out = []
    for line in lines[start:]:
        if line.startswith("## ") or (stop_at_subsection and line.startswith("### ")):
            break
        out.append(line)
    assert out, f"## {title} is empty"
    return "\n".join(out)


def tables(text: str) -> dict[str, list[list[str]]]:
    """Each markdown table of TEXT by its first header cell: its rows as lists of cells."""
    found: dict[str, list[list[str]]] = {}
    block: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if block:
            header, _separator, *rows = block
            assert header[0] not in found, f"two tables headed {header[0]!r}"
            found[header[0]] = rows
            block = []
    return found


def word(cell: str) -> str:
    """The backticked word of a first cell: `microvm.share=` -> microvm.share=."""
    assert cell.startswith("`") and cell.endswith("`") and cell.count("`") == 2, cell
    return cell[1:-1]


def words(rows: list[list[str]], column: int = 0) -> list[str]:
    return [word(row[column]) for row in rows]


def same(page: list[str], code: list[str] | tuple[str, ...]) -> None:
    assert len(page) == len(set(page)), f"listed twice on the page: {page}"
    assert sorted(set(code) - set(page)) == [], "in the code, not on the page"
    assert sorted(set(page) - set(code)) == [], "on the page, not in the code"


def test_boot_parameters() -> None:
    (rows,) = tables(section("Boot parameters", stop_at_subsection=True)).values()
    same([w.rstrip("=") for w in words(rows)], config.MOUNT_KEYS)


def test_boot_parameters_stop_where_the_switches_begin() -> None:
    assert "### Switches" in PAGE.read_text().split("## JSON config")[0]


def _json_tables() -> dict[str, list[list[str]]]:
    return tables(section("JSON config"))


def test_json_keys_and_fields() -> None:
    keys = words(_json_tables()["key"])
    same([k for k in keys if "." not in k and "[]" not in k], config_json.TOP_KEYS)
    for prefix, fields in (
        ("shares[].", config_json.SHARE_FIELDS),
        ("volumes[].", config_json.VOLUME_FIELDS),
        ("storeOverlay.", config_json.OVERLAY_FIELDS),
    ):
        same([k.removeprefix(prefix) for k in keys if k.startswith(prefix)], fields)
    listed = {k.split(".")[0].removesuffix("[]") for k in keys}
    assert listed == set(config_json.TOP_KEYS), "a field of a key that is not documented"


def test_json_ignored_keys() -> None:
    same(words(_json_tables()["ignored key"]), config_json.IGNORED_KEYS)


def test_json_old_spellings() -> None:
    rows = _json_tables()["old spelling"]
    page = [f"{word(old)} -> {word(new)}" for old, new in rows]
    code = {**config_json.DEPRECATED_KEYS, **config_json.DEPRECATED_FIELDS}
    same(page, [f"{old} -> {new}" for old, new in code.items()])


_KINDS = {
    "implemented": spec.AGENT_WORDS,
    "no effect": spec.IGNORED_WORDS,
    "refused": spec.REFUSED_WORDS,
}


def _option_rows() -> list[list[str]]:
    return tables(section("Option words"))["word"]


def test_option_words() -> None:
    same(words(_option_rows()), spec.OPTION_WORDS)


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_option_words_are_of_the_kind_the_page_says(kind: str) -> None:
    page = [word(row[0]) for row in _option_rows() if row[2] == kind]
    same(page, tuple(_KINDS[kind]))


def test_every_option_word_has_a_kind_the_page_knows() -> None:
    assert {row[2] for row in _option_rows()} == set(_KINDS)

"""The boot record in /run and the summary the host hears."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from guest_agent import commands, vmm_notify


def record(**extra: object) -> dict[str, object]:
    return {"version": 1, "ok": True, "mounts": [], "problems": [], **extra}


def test_written_atomically_and_read_back(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()  # /run is there; guest-agent/ in it is made
    directory = tmp_path / "run" / "guest-agent"
    assert commands.write_record(record(started=1.0), str(directory)) is None
    assert commands.write_record(record(started=2.0), str(directory)) is None
    assert sorted(os.listdir(directory)) == ["boot.json"]  # no temporary file left
    assert commands.read_record(str(directory)) == record(started=2.0)


def test_a_symlink_in_place_of_the_directory_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "guest-agent").symlink_to(elsewhere)
    reason = commands.write_record(record(), str(tmp_path / "guest-agent"))
    assert reason is not None and reason.startswith("cannot open")
    assert list(elsewhere.iterdir()) == []


def test_no_record_or_a_foreign_one_reads_as_none(tmp_path: Path) -> None:
    assert commands.read_record(str(tmp_path)) is None
    (tmp_path / "boot.json").write_text(json.dumps({"version": 99}))
    assert commands.read_record(str(tmp_path)) is None
    (tmp_path / "boot.json").write_text("{not json")
    assert commands.read_record(str(tmp_path)) is None


def test_a_clean_boot_and_an_empty_one() -> None:
    line, fields = commands.summary([{"where": "/a", "status": "mounted"}], [])
    assert line == "guest-agent: 1 mounted"
    assert ("X_GUEST_AGENT_RESULT", "ok") in fields
    assert commands.summary([], [])[0] == "guest-agent: nothing to mount"


def test_the_summary_counts_and_names_the_first_failure() -> None:
    mounts = [
        {"where": "/nix/.ro-store", "status": "mounted"},
        {"where": "/nix/store", "status": "mounted"},
        {"where": "/home", "status": "failed"},
    ]
    problems = [
        {"spec": "microvm.share=home:/home", "reason": "no share tagged 'home'", "fatal": True},
        {"spec": "microvm.volume=LABEL=x:/x", "reason": "not found (nofail)", "fatal": False},
    ]
    line, fields = commands.summary(mounts, problems)
    assert (
        line
        == "guest-agent: 1 failed, 2 mounted; 1 failed: microvm.share=home:/home: no share tagged 'home'"
    )
    assert fields == [
        ("X_GUEST_AGENT_RESULT", "failed"),
        ("X_GUEST_AGENT_FAILED", "1"),
        ("X_GUEST_AGENT_MOUNTED", "2"),
        ("X_GUEST_AGENT_ERRORS", "1"),
        ("X_GUEST_AGENT_WARNINGS", "1"),
        ("X_GUEST_AGENT_ERROR_1", "microvm.share=home:/home: no share tagged 'home'"),
    ]
    keys = [key for key, _ in fields]
    assert len(keys) == len(set(keys))
    payload = vmm_notify.message([("STATUS", line), *fields]).decode()
    assert payload.count("\n") == len(fields) + 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(database=None, max_examples=500, deadline=None)
@given(json_values)
def test_dumps_is_json_that_reads_back_the_same(value: object) -> None:
    text = commands.dumps(value)
    assert text.isascii() and "\n" not in text
    assert json.loads(text) == value == json.loads(json.dumps(value))


def test_dumps_spells_what_json_spells() -> None:
    for text in ['"', "\\", "\n", "\x00", "\x7f", "é", "\udcff", "😀", "a\tb"]:
        assert commands.dumps(text) == json.dumps(text), text

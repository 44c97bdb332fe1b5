"""The boot record in /run and the summary the host hears."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guest_agent import cli as commands
from guest_agent import vmm_notify
from guest_agent.cli import record as bootrecord
from guest_agent.cli.mount_all import record_text
from guest_agent.results import Result, Status
from guest_agent.spec import Problem


def record(**extra: object) -> dict[str, object]:
    return {"version": 1, "ok": True, "mounts": [], "problems": [], **extra}


def text(value: dict[str, object]) -> str:
    return json.dumps(value) + "\n"


def test_written_atomically_and_read_back(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()  # /run is there; guest-agent/ in it is made
    directory = tmp_path / "run" / "guest-agent"
    assert commands.write_record(text(record(started=1.0)), str(directory)) is None
    assert commands.write_record(text(record(started=2.0)), str(directory)) is None
    assert sorted(os.listdir(directory)) == ["boot.json"]  # no temporary file left
    assert bootrecord.read_record(str(directory)) == record(started=2.0)


def test_a_symlink_in_place_of_the_directory_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "guest-agent").symlink_to(elsewhere)
    reason = commands.write_record(text(record()), str(tmp_path / "guest-agent"))
    assert reason is not None and reason.startswith("cannot open")
    assert list(elsewhere.iterdir()) == []


def test_no_record_or_a_foreign_one_reads_as_none(tmp_path: Path) -> None:
    assert bootrecord.read_record(str(tmp_path)) is None
    (tmp_path / "boot.json").write_text(json.dumps({"version": 99}))
    assert bootrecord.read_record(str(tmp_path)) is None
    (tmp_path / "boot.json").write_text("{not json")
    assert bootrecord.read_record(str(tmp_path)) is None


def test_a_clean_boot_and_an_empty_one() -> None:
    line, fields = vmm_notify.summary([{"where": "/a", "status": "mounted"}], [])
    assert line == "guest-agent: 1 mounted"
    assert ("X_GUEST_AGENT_RESULT", "ok") in fields
    assert vmm_notify.summary([], [])[0] == "guest-agent: nothing to mount"


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
    line, fields = vmm_notify.summary(mounts, problems)
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
    text = bootrecord.dumps(value)
    assert text.isascii() and "\n" not in text
    assert json.loads(text) == value == json.loads(json.dumps(value))


def test_dumps_spells_what_json_spells() -> None:
    for text in ['"', "\\", "\n", "\x00", "\x7f", "é", "\udcff", "😀", "a\tb"]:
        assert bootrecord.dumps(text) == json.dumps(text), text


paths = st.text(max_size=12)  # any text: plain ASCII, quotes, control characters, surrogates
results = st.builds(
    Result,
    where=paths,
    spec=paths,
    status=st.sampled_from(Status.ALL),
    fstype=st.none() | paths,
    source=st.none() | paths,
    options=st.lists(paths, max_size=3).map(tuple),
    message=st.none() | paths,
)
problems = st.builds(Problem, spec=paths, reason=paths, hint=st.none() | paths, fatal=st.booleans())


@settings(database=None, max_examples=300, deadline=None)
@given(st.lists(results, max_size=4), st.lists(problems, max_size=3), st.integers(0, 1))
def test_the_record_is_mount_all_json_plus_its_run(
    mounts: list[Result], found: list[Problem], status: int
) -> None:
    """Its one-f-string path (plain ASCII) and the general writer (anything else) alike."""
    written = record_text(mounts, found, 1765000000.1234, 1765000001.5, status)
    assert written.endswith("}\n") and written.count("\n") == 1 and written.isascii()
    got = json.loads(written)
    assert tuple(got) == bootrecord.RECORD_FIELDS
    assert got == {
        **commands.json_output(not status, "mounts", [r.as_json() for r in mounts], found),
        "started": 1765000000.123,
        "finished": 1765000001.5,
        "exit_status": status,
    }


def test_the_usual_record_takes_the_plain_path_and_an_odd_one_the_general_writer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []
    monkeypatch.setattr(bootrecord, "dumps", lambda v: calls.append(v) or json.dumps(v))
    plain = Result("/home", "microvm.share=home:/home", "mounted", "virtiofs", "home", ("rw",))
    record_text([plain], [], 1.0, 2.0, 0)
    assert calls == []
    record_text([plain._replace(where='/h"ome')], [], 1.0, 2.0, 0)
    assert len(calls) == 1
    # a value that closes its string and opens a field of its own: escaped, not a field
    forged = plain._replace(where='/x", "status": "failed')
    assert json.loads(record_text([forged], [], 1.0, 2.0, 0))["mounts"][0]["status"] == "mounted"
    assert len(calls) == 2
    for odd in ("/a\\b", "/a\nb", "/a\x7fb", "/é", "/\udcff"):
        assert json.loads(record_text([plain._replace(source=odd)], [], 1.0, 2.0, 0))
    assert len(calls) == 7

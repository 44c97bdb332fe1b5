"""x-nix-db's error paths on real files in a temporary directory (no mounts): no exception
escapes the reconcile, failures are counted and end in a move aside, an interrupted
write-back is finished or undone, and registration is linear (issue 19)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.nixdb import copy as nixcopy
from guest_agent.nixdb import database as nixdb
from guest_agent.nixdb import record as nixrecord
from guest_agent.nixdb import schema as nixschema
from guest_agent.nixdb import state as nixstate
from guest_agent.nixdb import upper as nixupper
from guest_agent.nixdb.registration import Entry

H = "sha256:" + "0" * 64
B32 = "0123456789abcdfghijklmnpqrsvwxyz"


def name(i: int) -> str:
    digits = "".join(B32[(i >> (5 * k)) & 31] for k in range(7))
    return "0" * 25 + digits + f"-p{i}"


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[nixstate.Layers]:
    for d in ("lower", "rw/store"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "lower" / name(1)).write_text("1\n")
    fds = [os.open(tmp_path / d, os.O_RDONLY | os.O_DIRECTORY) for d in ("lower", "rw", "rw/store")]
    yield nixstate.Layers(*fds)
    for fd in fds:
        os.close(fd)


def test_an_unexpected_exception_is_one_reason_counted_and_three_move_the_state_aside(
    layers: nixstate.Layers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    said: list[str] = []
    nixstate.reconcile(layers, None, said.append)  # a fresh, good state
    (tmp_path / "rw/store/new").mkdir()  # something to reconcile

    def broken(*_: object) -> object:
        raise RuntimeError("a bug the agent has not met yet")

    monkeypatch.setattr(nixupper, "scan_upper", broken)
    for failures in (1, 2, 3):
        with pytest.raises(nixstate.NixStateError, match="RuntimeError: a bug"):
            nixstate.reconcile(layers, None, said.append)
        record = (tmp_path / "rw/nix-state/guest-agent-reconcile").read_text()
        assert f"failures {failures}\n" in record and "state failed\n" in record
    monkeypatch.undo()
    said.clear()
    report = nixstate.reconcile(layers, None, said.append)
    assert report.aside is not None and "failed 3 boots in a row" in said[0], said
    assert (tmp_path / "rw" / report.aside / "db/db.sqlite").is_file()  # kept, untouched
    assert "failures" not in (tmp_path / "rw/nix-state/guest-agent-reconcile").read_text()


def _state_with_a_wal(layers: nixstate.Layers, tmp_path: Path) -> Path:
    nixstate.reconcile(layers, None, lambda _: None)
    db = tmp_path / "rw/nix-state/db"
    (db / "db.sqlite-wal").write_bytes(b"the old database's WAL")
    (db / "db.sqlite-shm").write_bytes(b"shm")
    return db


def test_a_write_back_cut_after_the_rename_is_finished(
    layers: nixstate.Layers, tmp_path: Path
) -> None:
    db = _state_with_a_wal(layers, tmp_path)
    inode = (db / "db.sqlite").stat().st_ino  # the new file is in place, its WAL is stale
    fd = os.open(db, os.O_RDONLY | os.O_DIRECTORY)
    try:
        note = nixcopy.recover(fd, f"{inode}")
    finally:
        os.close(fd)
    assert note is not None and "finished" in note
    assert sorted(p.name for p in db.iterdir()) == ["db.sqlite", "schema"]


def test_a_write_back_cut_before_the_rename_is_undone(
    layers: nixstate.Layers, tmp_path: Path
) -> None:
    db = _state_with_a_wal(layers, tmp_path)
    (db / nixcopy.NEW_FILE).write_bytes(b"half written")
    fd = os.open(db, os.O_RDONLY | os.O_DIRECTORY)
    try:
        note = nixcopy.recover(fd, f"{(db / nixcopy.NEW_FILE).stat().st_ino}")
    finally:
        os.close(fd)
    assert note is not None and "dropped" in note
    assert (db / "db.sqlite-wal").read_bytes() == b"the old database's WAL"  # old db + its WAL


def test_sqlite_is_never_handed_a_name_on_rw(
    layers: nixstate.Layers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    opened: list[str] = []
    real = sqlite3.connect

    def spy(database: str, *args: object, **kwargs: object) -> sqlite3.Connection:
        opened.append(database)
        return real(database, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite3, "connect", spy)
    nixstate.reconcile(layers, None, lambda _: None)
    (tmp_path / "rw/store/new").mkdir()
    nixstate.reconcile(layers, None, lambda _: None)
    rw = str(tmp_path / "rw")
    assert opened and not [p for p in opened if rw in p or "/proc/self/fd" in p], opened


def test_registration_of_a_reverse_ordered_chain_is_linear_and_right(tmp_path: Path) -> None:
    """8 000 entries, each referring to the next, listed last first; the bottom one is not
    in the store, so none can be added: each is dropped once, through the reverse index."""
    work = tmp_path / "work"
    work.mkdir()
    conn = nixdb.create_database(str(work), nixschema.deadline())
    n = 8000
    entries = [Entry(name(i), H, 1, None, (name(i + 1),)) for i in reversed(range(n))]
    present = {name(i) for i in range(n)}  # name(n) is not
    calls = 0

    def counted(x: str) -> bool:
        nonlocal calls
        calls += 1
        return x in present

    out = nixdb.reconcile(conn, counted, entries, lambda _: None)
    assert out.valid == 0 and len(out.not_added) == n
    assert calls <= 2 * n
    present.add(name(n))
    entries.append(Entry(name(n), H, 1, None, ()))
    out = nixdb.reconcile(conn, present.__contains__, entries, lambda _: None)
    assert out.valid == n + 1


def test_a_row_of_bytes_that_are_not_utf8_is_that_rows_problem(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    conn = nixdb.create_database(str(work), nixschema.deadline())
    conn.execute(
        "insert into ValidPaths (path, hash, registrationTime)"
        " values (cast(x'2f6e69782f73746f72652fff' as text), 'h', 0)"
    )
    out = nixdb.reconcile(conn, lambda _: True, None, lambda _: None)
    assert out.gone == ["'/nix/store/\\udcff'"] and out.valid == 0


def test_the_deadline_interrupts_endless_sql(tmp_path: Path) -> None:
    import sqlite3
    import time

    work = tmp_path / "work"
    work.mkdir()
    conn = nixdb.create_database(str(work), time.monotonic() + 0.2)
    with pytest.raises(sqlite3.OperationalError, match="interrupt"):
        conn.execute(
            "with recursive n(i) as (select 1 union all select i + 1 from n) select count(*) from n"
        ).fetchone()


@pytest.mark.parametrize(
    "value", ["plain", "a\nstate done", "back\\slash", "sep\u2028arator", "\udcff-not-utf8"]
)
def test_record_values_cannot_add_a_line_or_a_key(tmp_path: Path, value: str) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        nixrecord.write_record(fd, {"state": "done", "gone": value})
        text = (tmp_path / nixrecord.RECORD).read_bytes().decode("utf-8", "surrogateescape")
        assert text.count("\n") == 2
        assert nixrecord.read_record(fd) == {"state": "done", "gone": value}
    finally:
        os.close(fd)

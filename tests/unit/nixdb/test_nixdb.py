"""nixdb.reconcile on a real SQLite database of Nix's schema (no Nix needed here; the host
tests compare the rows with `nix-store --load-db`'s)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from guest_agent.nixdb import database as nixdb
from guest_agent.nixdb import schema as nixschema
from guest_agent.nixdb.registration import Entry

H = "sha256:" + "0" * 64


def name(tag: str) -> str:
    """A store path's base name as Nix makes it (its hash in Nix's base-32 alphabet)."""
    return "0" * 31 + "0123456789abcdfghijklmnpqrsvwxyz"[ord(tag[0]) % 32] + "-" + tag


def entry(tag: str, *refs: str) -> Entry:
    return Entry(name(tag), H, 1, None, tuple(name(r) for r in refs))


@pytest.fixture
def db(tmp_path: Path) -> int:
    """An fd of a database directory (what the agent holds of RW/nix-state/db)."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd  # type: ignore[misc]
    os.close(fd)


@pytest.fixture
def work(tmp_path: Path) -> str:
    """The agent's private directory, where SQLite works on its copy."""
    (tmp_path / "work").mkdir()
    return str(tmp_path / "work")


def fresh(work: str) -> sqlite3.Connection:
    return nixdb.create_database(work, nixschema.deadline())


def valid(conn: object) -> set[str]:
    return {row[0].rsplit("-", 1)[1] for row in conn.execute("select path from ValidPaths")}  # type: ignore[attr-defined]


def test_invalidation_takes_every_referrer_and_survives_self_references(work: str) -> None:
    conn = fresh(work)
    # c -> b -> a, d -> c, e alone; b refers to itself (Nix allows it)
    reg = [entry("a"), entry("b", "a", "b"), entry("c", "b"), entry("d", "c"), entry("e")]
    everything = {e.name for e in reg}
    first = nixdb.reconcile(conn, everything.__contains__, reg, lambda n: None)
    assert first.added == sorted(everything) and first.valid == 5
    present = everything - {name("b")}
    out = nixdb.reconcile(conn, present.__contains__, None, lambda n: None)
    assert out.gone == [name("b")]
    assert out.dependents == sorted([name("c"), name("d")])
    assert valid(conn) == {"a", "e"}
    (refs,) = conn.execute("select count(*) from Refs").fetchone()
    assert refs == 0


def test_registered_paths_whose_references_cannot_be_valid_stay_invalid(work: str) -> None:
    conn = fresh(work)
    reg = [entry("a"), entry("b", "a"), entry("c", "b"), entry("x", "zzz")]
    present = {name("b"), name("c"), name("x")}  # a is not in the store
    out = nixdb.reconcile(conn, present.__contains__, reg, lambda n: None)
    assert out.valid == 0
    why = dict(out.not_added)
    assert why[name("a")] == "not in the store"
    assert "reference" in why[name("b")] and "reference" in why[name("c")]
    assert "reference" in why[name("x")]


def test_valid_rows_are_kept_except_for_replaced_copies(work: str) -> None:
    conn = fresh(work)
    old = Entry(name("a"), "sha256:" + "1" * 64, 7, None, ())
    nixdb.reconcile(conn, lambda n: True, [old], lambda n: None)
    conn.execute("update ValidPaths set sigs = 'cache:sig', ultimate = 1")
    new = [Entry(name("a"), H, 1, None, ())]
    nixdb.reconcile(conn, lambda n: True, new, lambda n: None)
    assert conn.execute("select hash, narSize, sigs, ultimate from ValidPaths").fetchone() == (
        "sha256:" + "1" * 64,
        7,
        "cache:sig",
        1,
    )
    nixdb.reconcile(conn, lambda n: True, new, lambda n: None, replaced={name("a")})
    assert conn.execute("select hash, narSize, sigs from ValidPaths").fetchone() == (
        H,
        1,
        "cache:sig",
    )


def test_a_failed_reconcile_changes_nothing(work: str) -> None:
    conn = fresh(work)
    reg = [entry("a"), entry("b", "a")]
    nixdb.reconcile(conn, lambda n: True, reg, lambda n: None)

    def broken(n: str) -> bool:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        nixdb.reconcile(conn, broken, reg, lambda n: None)
    assert valid(conn) == {"a", "b"}


@pytest.mark.parametrize(
    ("schema", "why"), [("11", "schema version 11"), ("ten", "not a version number")]
)
def test_unknown_schema_is_unusable(db: int, tmp_path: Path, schema: str, why: str) -> None:
    (tmp_path / "db.sqlite").write_bytes(b"")
    (tmp_path / "schema").write_text(schema)
    with pytest.raises(nixdb.Unusable, match=why):
        nixdb.check_version(db, True)


def test_database_files_must_be_plain_files(db: int, tmp_path: Path) -> None:
    (tmp_path / "db.sqlite").write_bytes(b"")
    (tmp_path / "db.sqlite-journal").symlink_to("/etc/passwd")
    with pytest.raises(nixdb.Unusable, match=r"db\.sqlite-journal is not a regular file"):
        nixdb.check_files(db)


def test_no_database_is_a_fresh_state(db: int) -> None:
    assert nixdb.check_files(db) is False
    nixdb.check_version(db, False)


# What only a reconcile imports: SQLite, the registration parser, the database code, the
# steps on the copy, and the temporary directory's modules (tempfile, shutil: 16 modules).
_RECONCILE_ONLY = frozenset(
    {"sqlite3", "guest_agent.nixdb.database", "guest_agent.nixdb.registration", "guest_agent.nixdb.steps"}
    | {"guest_agent.nixdb.upper", "tempfile", "shutil"}
)


def test_a_boot_with_nothing_changed_imports_no_sqlite(tmp_path: Path) -> None:
    """The fast path (fingerprint unchanged) is a few stats: nothing of SQLite, the
    registration parser or the database code is imported (each is paid on every boot)."""
    import subprocess
    import sys
    import textwrap

    ci = "0" * 31 + "c-closure-info"
    (tmp_path / "lower" / ci).mkdir(parents=True)
    (tmp_path / "lower" / name("a")).write_text("a\n")
    (tmp_path / "lower" / ci / "registration").write_text(
        f"/nix/store/{name('a')}\n{'0' * 64}\n1\n\n0\n"
    )
    (tmp_path / "rw" / "store").mkdir(parents=True)
    program = textwrap.dedent(
        f"""
        import os, sys
        from guest_agent.nixdb import state as nixstate
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in
               ("{tmp_path}/lower", "{tmp_path}/rw", "{tmp_path}/rw/store")]
        report = nixstate.reconcile(nixstate.Layers(*fds), "/nix/store/{ci}/registration", print)
        print("skipped" if report.skipped else "reconciled")
        print(sorted(m for m in {sorted(_RECONCILE_ONLY)} if m in sys.modules))
        """
    )
    runs = [
        subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    first, second = (r.stdout.splitlines() for r in runs)
    assert first[-2:] == ["reconciled", str(sorted(_RECONCILE_ONLY))], first
    assert second[-2:] == ["skipped", "[]"], second

"""Nix's database (schema 10), written the way Nix writes it, with the stdlib's sqlite3.

The database SQLite sees is the agent's private copy (copy.py), never a file
on RW. `open_database` refuses (raises `Unusable`) anything the agent does not
understand before it reads a row: a schema file other than 10, a schema other
than Nix's to the statement, values of types Nix never writes (schema.py),
a failed integrity or foreign-key check; the caller moves the state aside
untouched. `reconcile` makes the valid paths agree with what the store holds, in
one transaction. Nix opens the database with foreign keys on: `Refs.reference`
is `on delete restrict`, so paths are invalidated referrers first.
"""

from __future__ import annotations

import os

from guest_agent.nixdb import schema as nixschema
from guest_agent.nixdb.files import (  # noqa: F401 (re-exported: the database's own names)
    DB_FILE,
    DB_FILES,
    SCHEMA_FILE,
    STORE_DIR,
    NixDbError,
    Unusable,
    check_files,
    is_store_name,
    read_owned,
    write_small_file,
)
from guest_agent.nixdb.registration import Entry, Registration
from guest_agent.nixdb.rows import invalidate, register, shown
from guest_agent.nixdb.schema import SCHEMA_VERSION
from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Collection

_MAX_SCHEMA_FILE = 64
_COLUMNS = "id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca"


class Outcome(NamedTuple):
    gone: list[str]  # valid paths absent from the store, invalidated
    dependents: list[str]  # invalidated because something they reference is gone
    added: list[str]  # registered paths made valid
    not_added: list[tuple[str, str]]  # (name, why) registered paths left invalid
    valid: int  # valid paths after the reconcile


def read_schema(db_dir: int) -> int | None:
    """The schema version in db/schema, None when the file is missing; Unusable when it is
    not a small regular file of one link holding a number."""
    text = read_owned(db_dir, SCHEMA_FILE, _MAX_SCHEMA_FILE)
    if text is None:
        return None
    try:
        return int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise Unusable(f"{SCHEMA_FILE} holds {text[:20]!r}, not a version number") from None


def _text(data: bytes) -> str:
    # A path that is not UTF-8 is that row's problem (it names no store path), not the boot's.
    return data.decode("utf-8", "surrogateescape")


def connect(work: str, deadline: float, *, create: bool = False) -> sqlite3.Connection:
    """SQLite on the private copy in WORK (copy.py), hardened (nixschema.harden)."""
    import sqlite3

    path = os.path.join(work, DB_FILE)
    mode = "rwc" if create else "rw"
    try:
        conn = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise Unusable(f"SQLite cannot open it: {e}") from None
    try:
        conn.text_factory = _text
        nixschema.harden(conn, deadline)
        conn.execute("pragma foreign_keys = 1")
    except sqlite3.Error as e:
        conn.close()
        raise Unusable(f"SQLite cannot open it: {e}") from None
    return conn


def check_version(db_dir: int, exists: bool) -> None:
    """Unusable unless db/schema says 10 for an existing database (or is absent without one)."""
    version = read_schema(db_dir)
    if not exists:
        if version not in (None, SCHEMA_VERSION):
            raise Unusable(f"schema version {version} but no database")
        return
    if version is None:
        raise Unusable(f"{DB_FILE} exists without a {SCHEMA_FILE} file (an interrupted creation)")
    if version != SCHEMA_VERSION:
        raise Unusable(f"schema version {version}, this agent knows {SCHEMA_VERSION}")


def open_database(
    work: str, deadline: float, *, check_integrity: bool = True
) -> sqlite3.Connection:
    """The private copy in WORK, checked before a row is read: Nix's schema exactly, the
    types Nix writes, and (CHECK_INTEGRITY: the caller skips it for files unchanged since
    the agent last checked and wrote them) `integrity_check` and `foreign_key_check`.
    Unusable otherwise; also when a check runs past DEADLINE."""
    import sqlite3

    conn = connect(work, deadline)
    try:
        nixschema.check_schema(conn)
        if check_integrity:
            verdict = [row[0] for row in conn.execute("pragma integrity_check(20)")]
            if verdict != ["ok"]:
                raise Unusable(f"integrity_check says {'; '.join(map(str, verdict[:3]))}")
            if conn.execute("pragma foreign_key_check").fetchone() is not None:
                raise Unusable("foreign_key_check finds references to rows that do not exist")
        nixschema.check_values(conn)
        if conn.execute("pragma journal_mode").fetchone()[0] != "wal":
            conn.execute("pragma journal_mode = wal")  # as Nix keeps it
    except sqlite3.Error as e:
        conn.close()
        raise Unusable(f"SQLite says {e}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def create_database(work: str, deadline: float) -> sqlite3.Connection:
    """A fresh, empty database of schema 10 (WAL, as Nix uses it) in WORK."""
    conn = connect(work, deadline, create=True)
    conn.execute("pragma journal_mode = wal")
    conn.executescript(nixschema.SCHEMA_SQL)
    return conn


def write_schema_file(db_dir: int) -> None:
    write_small_file(db_dir, SCHEMA_FILE, f"{SCHEMA_VERSION}".encode())


def reconcile(
    conn: sqlite3.Connection,
    present: Callable[[str], bool],
    registration: Registration | list[Entry] | None,
    read_derivation: Callable[[str], bytes | None],
    replaced: Collection[str] = (),
) -> Outcome:
    """Invalidate what the store lost, then register what the registration adds, in one
    transaction.

    PRESENT(name) tells whether the store (the merged view) holds a path. Of a
    `Registration` (checked by the caller), only the entries not valid (or REPLACED)
    are converted. A row whose
    path is not a store path (another directory, a name Nix would not make, bytes that
    are not UTF-8, a second row for one path) names nothing in the store: it is
    invalidated like a path that is gone. REPLACED names paths whose upper copy gave
    way to the lower's: a valid row of one of those takes the registration's hash and
    size (the content on view now).
    """
    prefix = STORE_DIR + "/"
    conn.execute("begin immediate")
    try:
        ids: dict[str, int] = {}
        gone: list[int] = []
        names: dict[int, str] = {}
        for row_id, path in conn.execute("select id, path from ValidPaths"):
            name = path[len(prefix) :] if path.startswith(prefix) else ""
            if not is_store_name(name) or name in ids:
                names[row_id] = shown(path)
                gone.append(row_id)
                continue
            ids[name] = row_id
            names[row_id] = name
            if not present(name):
                gone.append(row_id)
        doomed = invalidate(conn, gone) if gone else []
        gone_set = set(gone)
        for row_id in doomed:
            if ids.get(names[row_id]) == row_id:
                del ids[names[row_id]]
        if isinstance(registration, Registration):  # checked whole: converting cannot fail
            keep = set(replaced)
            entries = registration.entries(skip={n for n in ids if n not in keep})
        else:
            entries = registration or []
        added, not_added = (
            register(conn, ids, present, entries, read_derivation, replaced)
            if entries
            else ([], [])
        )
        (valid,) = conn.execute("select count(*) from ValidPaths").fetchone()
        conn.execute("commit")
    except BaseException:
        try:
            conn.execute("rollback")
        except Exception:
            pass  # the connection is closed by the caller; nothing was committed
        raise
    return Outcome(
        sorted(names[i] for i in gone),
        sorted(names[i] for i in doomed if i not in gone_set),
        added,
        not_added,
        int(valid),
    )


def count_valid(conn: sqlite3.Connection) -> int:
    (valid,) = conn.execute("select count(*) from ValidPaths").fetchone()
    return int(valid)

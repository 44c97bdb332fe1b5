"""Nix's database (schema 10), written the way Nix writes it, with the stdlib's sqlite3.

`open_database` refuses (raises `Unusable`) anything the agent does not
understand, so that the caller moves it aside untouched; `reconcile` makes the
valid paths agree with what the store holds, in one transaction. Nix opens
the database with foreign keys on: `Refs.reference` is `on delete restrict`,
so paths are invalidated referrers first.

The database is reached as /proc/self/fd/N/db.sqlite, N an fd of its directory
opened inside RW; its files (`db.sqlite`, `-wal`, `-shm`, `-journal`) must be
regular files or absent, so that SQLite never follows a link planted on RW.
"""

from __future__ import annotations

import os
import stat
import time

from guest_agent.nixfiles import (  # noqa: F401 (re-exported: the database's own names)
    DB_FILE,
    DB_FILES,
    SCHEMA_FILE,
    STORE_DIR,
    NixDbError,
    Unusable,
    check_files,
    write_small_file,
)
from guest_agent.nixreg import Entry, Registration, derivation_outputs
from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Collection

SCHEMA_VERSION = 10
_MAX_SCHEMA_FILE = 64
# Nix's schema.sql (libstore) for schema 10, as Nix itself creates it.
_SCHEMA_SQL = """
create table if not exists ValidPaths (
    id               integer primary key autoincrement not null,
    path             text unique not null,
    hash             text not null,
    registrationTime integer not null,
    deriver          text,
    narSize          integer,
    ultimate         integer, -- null implies "false"
    sigs             text, -- space-separated
    ca               text -- if not null, an assertion that the path is content-addressed; see ValidPathInfo
);
create table if not exists Refs (
    referrer  integer not null,
    reference integer not null,
    primary key (referrer, reference),
    foreign key (referrer) references ValidPaths(id) on delete cascade,
    foreign key (reference) references ValidPaths(id) on delete restrict
);
create index if not exists IndexReferrer on Refs(referrer);
create index if not exists IndexReference on Refs(reference);
create trigger if not exists DeleteSelfRefs before delete on ValidPaths
  begin
    delete from Refs where referrer = old.id and reference = old.id;
  end;
create table if not exists DerivationOutputs (
    drv  integer not null,
    id   text not null, -- symbolic output id, usually "out"
    path text not null,
    primary key (drv, id),
    foreign key (drv) references ValidPaths(id) on delete cascade
);
create index if not exists IndexDerivationOutputs on DerivationOutputs(path);
"""
_COLUMNS = "id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca"


class Outcome(NamedTuple):
    gone: list[str]  # valid paths absent from the store, invalidated
    dependents: list[str]  # invalidated because something they reference is gone
    added: list[str]  # registered paths made valid
    not_added: list[tuple[str, str]]  # (name, why) registered paths left invalid
    valid: int  # valid paths after the reconcile


def read_schema(db_dir: int) -> int | None:
    """The schema version in db/schema, None when the file is missing; Unusable when unreadable."""
    try:
        fd = os.open(
            SCHEMA_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=db_dir
        )
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Unusable(f"{SCHEMA_FILE}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Unusable(f"{SCHEMA_FILE} is not a regular file")
        text = os.read(fd, _MAX_SCHEMA_FILE)
    finally:
        os.close(fd)
    try:
        return int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise Unusable(f"{SCHEMA_FILE} holds {text[:20]!r}, not a version number") from None


def _connect(db_dir: int, *, create: bool) -> sqlite3.Connection:
    import sqlite3

    path = f"/proc/self/fd/{db_dir}/{DB_FILE}"
    mode = "rwc" if create else "rw"
    try:
        conn = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None)
        conn.execute("pragma foreign_keys = 1")
        conn.execute("pragma synchronous = full")  # durable before the record says done
    except sqlite3.Error as e:
        raise Unusable(f"SQLite cannot open it: {e}") from None
    return conn


def open_database(db_dir: int, *, check_integrity: bool = True) -> sqlite3.Connection | None:
    """The existing database, checked; None when there is none (a fresh state directory).

    Unusable: a schema version other than 10, a file that is not a regular
    file, a database SQLite cannot open, whose tables are not Nix's, or that
    fails `pragma integrity_check` (run when CHECK_INTEGRITY: the caller skips
    it for files unchanged since the agent last checked and wrote them).
    """
    import sqlite3

    version = read_schema(db_dir)
    exists = check_files(db_dir)
    if not exists:
        if version not in (None, SCHEMA_VERSION):
            raise Unusable(f"schema version {version} but no database")
        return None
    if version is None:
        raise Unusable(f"{DB_FILE} exists without a {SCHEMA_FILE} file (an interrupted creation)")
    if version != SCHEMA_VERSION:
        raise Unusable(f"schema version {version}, this agent knows {SCHEMA_VERSION}")
    conn = _connect(db_dir, create=False)
    try:
        verdict = ["ok"]
        if check_integrity:
            verdict = [row[0] for row in conn.execute("pragma integrity_check")]
        if verdict != ["ok"]:
            raise Unusable(f"integrity_check says {'; '.join(map(str, verdict[:3]))}")
        conn.execute(f"select {_COLUMNS} from ValidPaths limit 0")
        conn.execute("select referrer, reference from Refs limit 0")
        conn.execute("select drv, id, path from DerivationOutputs limit 0")
    except sqlite3.Error as e:
        conn.close()
        raise Unusable(f"SQLite says {e}") from None
    except Unusable:
        conn.close()
        raise
    return conn


def create_database(db_dir: int) -> sqlite3.Connection:
    """A fresh, empty database of schema 10 (WAL, as Nix uses it), and its schema file."""
    for name in DB_FILES:
        try:
            os.unlink(name, dir_fd=db_dir)  # leftovers of an interrupted creation
        except FileNotFoundError:
            pass
    conn = _connect(db_dir, create=True)
    conn.execute("pragma journal_mode = wal")
    conn.executescript(_SCHEMA_SQL)
    write_small_file(db_dir, SCHEMA_FILE, f"{SCHEMA_VERSION}".encode())
    return conn


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
    `Registration`, only the entries not valid (or REPLACED) are parsed in full; a
    malformed one raises RegistrationError, after the rollback.
    REPLACED names paths whose upper copy gave way to the lower's: a valid row of
    one of those takes the registration's hash and size (the content on view now).
    """
    prefix = STORE_DIR + "/"
    conn.execute("begin immediate")
    try:
        ids: dict[str, int] = {}
        gone: list[int] = []
        names: dict[int, str] = {}
        for row_id, path in conn.execute("select id, path from ValidPaths"):
            name = path[len(prefix) :] if path.startswith(prefix) else path
            ids[name] = row_id
            names[row_id] = name
            if name == path or not present(name):
                gone.append(row_id)
        doomed = _invalidate(conn, gone) if gone else []
        gone_set = set(gone)
        for row_id in doomed:
            del ids[names[row_id]]
        if isinstance(registration, Registration):
            keep = set(replaced)
            entries = registration.entries(skip={n for n in ids if n not in keep})
        else:
            entries = registration or []
        added, not_added = (
            _register(conn, ids, present, entries, read_derivation, replaced)
            if entries
            else ([], [])
        )
        (valid,) = conn.execute("select count(*) from ValidPaths").fetchone()
        conn.execute("commit")
    except BaseException:
        conn.execute("rollback")
        raise
    return Outcome(
        sorted(names[i] for i in gone),
        sorted(names[i] for i in doomed if i not in gone_set),
        added,
        not_added,
        int(valid),
    )


def _invalidate(conn: sqlite3.Connection, gone: list[int]) -> list[int]:
    """Invalidate GONE and every path referring to them, transitively; return their ids.

    Referrers first, as Nix's `on delete restrict` on Refs.reference demands: the
    doomed paths' own references go first (every referrer of a doomed path is
    doomed), then the rows, whose DerivationOutputs cascade.
    """
    conn.execute("create temp table if not exists Doomed (id integer primary key)")
    conn.execute("delete from temp.Doomed")
    conn.executemany("insert into temp.Doomed (id) values (?)", ((i,) for i in gone))
    conn.execute(
        "insert or ignore into temp.Doomed (id)"
        " with recursive Up(id) as (select id from temp.Doomed"
        "  union select Refs.referrer from Refs join Up on Refs.reference = Up.id)"
        " select id from Up"
    )
    doomed = [row[0] for row in conn.execute("select id from temp.Doomed")]
    conn.execute("delete from Refs where referrer in (select id from temp.Doomed)")
    conn.execute("delete from ValidPaths where id in (select id from temp.Doomed)")
    conn.execute("delete from temp.Doomed")
    return doomed


def _register(
    conn: sqlite3.Connection,
    ids: dict[str, int],
    present: Callable[[str], bool],
    registration: list[Entry],
    read_derivation: Callable[[str], bytes | None],
    replaced: Collection[str],
) -> tuple[list[str], list[tuple[str, str]]]:
    """Add the entries not yet valid, as `nix-store --load-db` adds them: rows first, then
    references, then a derivation's outputs; valid rows are kept."""
    prefix = STORE_DIR + "/"
    wanted: dict[str, Entry] = {}
    not_added: list[tuple[str, str]] = []
    for entry in registration:
        if entry.name in ids:
            if entry.name in replaced:
                conn.execute(
                    "update ValidPaths set hash = ?, narSize = ? where id = ?",
                    (entry.nar_hash, entry.nar_size, ids[entry.name]),
                )
            continue
        if entry.name in wanted:
            continue
        if present(entry.name):
            wanted[entry.name] = entry
        else:
            not_added.append((entry.name, "not in the store"))
    # An entry whose reference is neither valid nor addable cannot be added (Nix requires
    # references to be valid); drop such entries until none is left.
    changed = True
    while changed:
        changed = False
        for name, entry in list(wanted.items()):
            missing = next((r for r in entry.references if r not in ids and r not in wanted), None)
            if missing is not None:
                del wanted[name]
                not_added.append((name, f"its reference {missing} is not in the store"))
                changed = True
    now = int(time.time())
    for name, entry in wanted.items():
        cursor = conn.execute(
            "insert into ValidPaths (path, hash, registrationTime, deriver, narSize)"
            " values (?, ?, ?, ?, ?)",
            (prefix + name, entry.nar_hash, now, entry.deriver, entry.nar_size),
        )
        ids[name] = int(cursor.lastrowid or 0)
    conn.executemany(
        "insert or ignore into Refs (referrer, reference) values (?, ?)",
        ((ids[name], ids[ref]) for name, e in wanted.items() for ref in e.references),
    )
    for name in wanted:
        if not name.endswith(".drv"):
            continue
        text = read_derivation(name)
        try:
            outputs = derivation_outputs(text) if text is not None else []
        except ValueError:
            outputs = []  # Nix would refuse the registration; the path stays valid without them
        conn.executemany(
            "insert or replace into DerivationOutputs (drv, id, path) values (?, ?, ?)",
            ((ids[name], output, path) for output, path in outputs),
        )
    return sorted(wanted), not_added


def count_valid(conn: sqlite3.Connection) -> int:
    (valid,) = conn.execute("select count(*) from ValidPaths").fetchone()
    return int(valid)

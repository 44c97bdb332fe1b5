"""What a Nix database must be before the agent reads a row of it, and the bounds SQLite works
under: the file is a stranger's, and SQLite runs what its schema says (views, triggers).

`check_schema`: `sqlite_master` equals what Nix writes for schema 10 (tables, indices,
the one trigger), nothing more: no view, no extra trigger, no table of another tool.
`check_values`: every column the reconcile reads, or that Nix relies on, has the type
Nix writes (a path stored as a BLOB, a NULL id, an integer hash are refused), and the
row count is bounded. `harden`: trusted_schema off, defensive mode where the module
offers it, no extensions, a deadline and a heap limit. Any refusal is `Unusable`: the
caller moves the state aside untouched.
"""

from __future__ import annotations

import re
import time

from guest_agent.nixdb.files import Unusable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import sqlite3

SCHEMA_VERSION = 10
# Nix's schema.sql (libstore) for schema 10, as Nix itself creates it.
SCHEMA_SQL = """
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
MAX_VALID_PATHS = 2_000_000  # 20x a large store; bounds the Python-side sets and dicts
DEADLINE_SECONDS = 30.0
HEAP_LIMIT = 256 << 20
_PROGRESS_STEPS = 10_000  # SQLite VM instructions between two looks at the clock
# (table, column, the types Nix writes there): typeof() of every row must be one of them.
_COLUMN_TYPES = (
    ("ValidPaths", "id", ("integer",)),
    ("ValidPaths", "path", ("text",)),
    ("ValidPaths", "hash", ("text",)),
    ("ValidPaths", "registrationTime", ("integer",)),
    ("ValidPaths", "deriver", ("text", "null")),
    ("ValidPaths", "narSize", ("integer", "null")),
    ("ValidPaths", "ultimate", ("integer", "null")),
    ("ValidPaths", "sigs", ("text", "null")),
    ("ValidPaths", "ca", ("text", "null")),
    ("Refs", "referrer", ("integer",)),
    ("Refs", "reference", ("integer",)),
    ("DerivationOutputs", "drv", ("integer",)),
    ("DerivationOutputs", "id", ("text",)),
    ("DerivationOutputs", "path", ("text",)),
)
_COMMENT = re.compile(r"--[^\n]*")
_expected: frozenset[tuple[str, str, str, str]] | None = None


def _normal(sql: str | None) -> str:
    """SQL text without comments and with white space folded. Nix's statements hold no
    quote, so nothing that survives this can hide inside a string literal."""
    return " ".join(_COMMENT.sub(" ", sql).split()) if sql is not None else ""


def _master(conn: sqlite3.Connection) -> frozenset[tuple[str, str, str, str]]:
    rows = conn.execute("select type, name, tbl_name, sql from sqlite_master").fetchall()
    if any(not all(isinstance(v, str) or v is None for v in row) for row in rows):
        raise Unusable("its schema table holds values that are not text")
    return frozenset((t, n, tbl, _normal(sql)) for t, n, tbl, sql in rows)


def expected_master() -> frozenset[tuple[str, str, str, str]]:
    """`sqlite_master` as Nix's schema.sql leaves it, made by this SQLite in memory."""
    global _expected
    if _expected is None:
        import sqlite3

        conn = sqlite3.connect(":memory:")
        try:
            conn.executescript(SCHEMA_SQL)
            _expected = _master(conn)
        finally:
            conn.close()
    return _expected


def check_schema(conn: sqlite3.Connection) -> None:
    """Unusable unless the database's schema is exactly Nix's (schema 10)."""
    found = _master(conn)
    expected = expected_master()
    if found != expected:
        extra = sorted(f"{t} {n}" for t, n, _, _ in found - expected)
        missing = sorted(f"{t} {n}" for t, n, _, _ in expected - found)
        parts = []
        if extra:
            parts.append("has " + ", ".join(extra[:5]) + (" …" if len(extra) > 5 else ""))
        if missing:
            parts.append("lacks " + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""))
        raise Unusable("its schema is not Nix's: " + "; ".join(parts) + " (as Nix writes them)")


def check_values(conn: sqlite3.Connection) -> None:
    """Unusable when a column holds a type Nix never writes there, or the table is too large."""
    (count,) = conn.execute("select count(*) from ValidPaths").fetchone()
    if count > MAX_VALID_PATHS:
        raise Unusable(f"{count} valid paths, more than the {MAX_VALID_PATHS} the agent reads")
    for table, column, types in _COLUMN_TYPES:
        allowed = ", ".join(f"'{t}'" for t in types)
        row = conn.execute(
            f"select typeof({column}) from {table} where typeof({column}) not in ({allowed}) limit 1"
        ).fetchone()
        if row is not None:
            raise Unusable(
                f"{table}.{column} holds a value of type {row[0]}, Nix writes {types[0]}"
            )


def harden(conn: sqlite3.Connection, deadline: float) -> None:
    """Limits for a database the agent did not write: its schema is not trusted to run
    functions, no extension loads, SQLite's heap is capped, and every statement is
    interrupted past DEADLINE (a time.monotonic() value: sqlite3.OperationalError)."""
    import sqlite3

    conn.execute("pragma trusted_schema = off")
    conn.execute(f"pragma hard_heap_limit = {HEAP_LIMIT}")
    conn.execute("pragma temp_store = memory")  # no temporary file anywhere
    conn.execute("pragma mmap_size = 0")
    conn.execute("pragma cell_size_check = on")
    defensive = getattr(sqlite3, "SQLITE_DBCONFIG_DEFENSIVE", None)
    if defensive is not None and hasattr(conn, "setconfig"):  # Python 3.12+
        conn.setconfig(defensive, True)
    if hasattr(conn, "enable_load_extension"):
        conn.enable_load_extension(False)
    conn.set_progress_handler(lambda: time.monotonic() > deadline, _PROGRESS_STEPS)


def deadline() -> float:
    return time.monotonic() + DEADLINE_SECONDS

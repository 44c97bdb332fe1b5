"""The row work of x-nix-db's reconcile (nixdb.reconcile runs it in its transaction):
invalidating paths with their referrers, and registering entries as
`nix-store --load-db` does.
"""

from __future__ import annotations

import time

from guest_agent.nixdb.files import STORE_DIR
from guest_agent.nixdb.registration import Entry, derivation_outputs

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Collection


def shown(path: str) -> str:
    """A row's path as a log line may quote it: printable, short, on one line."""
    text = ascii(path)
    return text if len(text) <= 120 else text[:117] + "..."


def invalidate(conn: sqlite3.Connection, gone: list[int]) -> list[int]:
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


def register(
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
    # references to be valid); nor can its referrers, transitively. Linear: each entry is
    # dropped once, and its referrers are found through a reverse index.
    referrers: dict[str, list[str]] = {}
    blocked: list[tuple[str, str]] = []
    for name, entry in wanted.items():
        for ref in entry.references:
            if ref in ids:
                continue
            if ref in wanted:
                referrers.setdefault(ref, []).append(name)
            else:
                blocked.append((name, ref))
    dropped: set[str] = set()
    while blocked:
        name, missing = blocked.pop()
        if name in dropped:
            continue
        dropped.add(name)
        not_added.append((name, f"its reference {shown(missing)} is not in the store"))
        blocked.extend((referrer, name) for referrer in referrers.get(name, ()))
    for name in dropped:
        del wanted[name]
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

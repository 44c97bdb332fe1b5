"""x-nix-db's steps 1-3 on a private copy of Nix's database, run by nixstate when the
fingerprint says something changed: the upper layer cleaned (nixupper), the valid paths
made to agree with the store (nixdb), the copy written back whole when it changed
(nixcopy), and one log line per kind of change. Imported only for a reconcile: an
unchanged boot does not pay for it (nor for SQLite, imported only below).
"""

from __future__ import annotations

import os

from guest_agent.kernel.syscalls import closing
from guest_agent.nixdb import copy as nixcopy
from guest_agent.nixdb import database as nixdb
from guest_agent.nixdb import files as nixfiles
from guest_agent.nixdb import record as nixrecord
from guest_agent.nixdb import schema as nixschema
from guest_agent.nixdb import upper as nixupper

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable

    from guest_agent.nixdb.database import Outcome
    from guest_agent.nixdb.layers import Layers
    from guest_agent.nixdb.registration import Registration

MAX_DERIVATION = 16 << 20


def reconcile_copy(
    layers: Layers,
    state: int,
    db: int,
    record: dict[str, str],
    before: str,
    registration: Registration | None,
    closure_info: str | None,
    say: Callable[[str], None],
) -> tuple[Outcome, list[str], list[str]]:
    """Steps 1-3 on a private copy of the database, written back when it changed."""
    import sqlite3  # only now: a boot with nothing to reconcile does not pay for it

    deadline = nixschema.deadline()
    exists = nixfiles.check_files(db)
    nixdb.check_version(db, exists)
    work = nixcopy.take(db) if exists else nixcopy.private_dir()
    try:
        try:
            if exists and work is not None:
                check = not nixrecord.db_unchanged(record, before)
                conn = nixdb.open_database(work, deadline, check_integrity=check)
            else:
                work = work or nixcopy.private_dir()
                conn = nixdb.create_database(work, deadline)
            try:
                nixrecord.write_record(state, {**record, "state": "reconciling"})
                outcome, whiteouts, copies = _steps(layers, conn, registration, closure_info, say)
                changed = conn.total_changes > 0 or not exists
                conn.execute("pragma wal_checkpoint(truncate)")
            finally:
                conn.close()
        except sqlite3.Error as e:  # on the agent's own copy: the database's content is at fault
            raise nixfiles.Unusable(f"SQLite says {e}") from None
        if changed:
            size = os.stat(os.path.join(work, nixfiles.DB_FILE)).st_size
            say(f"writing the Nix database back to RW ({size >> 10} KiB, replacing it whole)")
            inode = nixcopy.write_new(db, work)
            nixrecord.write_record(state, {**record, "state": "writing-back", "new-db": f"{inode}"})
            if not exists:
                nixdb.write_schema_file(db)
            say("putting the new Nix database in place of the old one")
            nixcopy.put_in_place(db)
    finally:
        nixcopy.discard(work)
    return outcome, whiteouts, copies


def _steps(
    layers: Layers,
    conn: sqlite3.Connection,
    registration: Registration | None,
    closure_info: str | None,
    say: Callable[[str], None],
) -> tuple[Outcome, list[str], list[str]]:
    registered = set(registration.names) if registration is not None else set()
    if closure_info:
        registered.add(closure_info)
    lower_names = set(os.listdir(layers.lower))
    upper = nixupper.scan_upper(layers.upper)
    whiteouts, copies = nixupper.clean_upper(layers, upper, lower_names, registered)
    if whiteouts:
        say(
            f"removed {len(whiteouts)} whiteouts hiding registered lower store paths: {_some(whiteouts)}"
        )
    if copies:
        say(
            f"moved {len(copies)} upper copies of registered lower store paths to the trash: {_some(copies)}"
        )

    def present(name: str) -> bool:
        return name in upper.visible or (name in lower_names and name not in upper.whiteouts)

    read = _read_derivation(layers, upper)
    names = len(registered) - (1 if closure_info else 0)
    say(f"checking the valid paths against the store and {names} registered paths")
    outcome = nixdb.reconcile(conn, present, registration, read, set(copies))
    return outcome, whiteouts, copies


def _read_derivation(layers: Layers, upper: nixupper.Upper) -> Callable[[str], bytes | None]:
    def read(name: str) -> bytes | None:
        layer = layers.upper if name in upper.visible else layers.lower
        try:  # looked at before it is opened: a device node or FIFO in the upper is not
            fd = nixfiles.open_owned(layer, name, MAX_DERIVATION, links_ok=True)
        except (OSError, nixfiles.Unusable):
            return None
        if fd is None:
            return None
        with closing(fd):
            return nixfiles.read_fd(fd, MAX_DERIVATION)

    return read


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def tell(outcome: Outcome, say: Callable[[str], None]) -> None:
    if outcome.gone:
        say(
            f"invalidated {len(outcome.gone)} store paths no longer in the store: {_some(outcome.gone)}"
        )
    if outcome.dependents:
        say(
            f"invalidated {len(outcome.dependents)} store paths whose dependencies left the lower"
            f" store: {_some(outcome.dependents)}"
        )
    if outcome.not_added:
        names = [f"{n} ({why})" for n, why in outcome.not_added]
        say(f"warning: left {len(names)} registered paths invalid: {_some(names)}")
    say(f"Nix database: {outcome.valid} valid paths, {len(outcome.added)} registered now")

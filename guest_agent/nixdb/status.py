"""`status`'s view of x-nix-db: the valid paths now (counted on a private copy of the
database) and what the last reconcile did, from its record (record.py).
"""

from __future__ import annotations

import os
import time

from guest_agent.kernel.syscalls import closing
from guest_agent.nixdb import files as nixfiles
from guest_agent.nixdb.record import DB_DIR, read_record
from guest_agent.reset import open_dir
from guest_agent.spec import NIX_STATE_DIR


def describe(rw: int) -> dict[str, object]:
    """For `status`: the valid paths now, and what the last reconcile did (from its record).
    Reads only; the count falls back to the record's when the database cannot be read."""
    from guest_agent.reset import WrongType

    try:
        state = open_dir(rw, NIX_STATE_DIR, create=False)
    except FileNotFoundError:
        return {"state": "never", "valid_paths": None}
    except (OSError, WrongType) as e:
        return {"state": "unreadable", "valid_paths": None, "error": str(e)}
    with closing(state):
        try:
            record = read_record(state)
        except nixfiles.Unusable as e:
            return {"state": "unreadable", "valid_paths": None, "error": str(e)}
        valid = _count_now(state)
    gone, dependents = (record.get(k, "0").split() for k in ("gone", "dependents"))
    stamp = record.get("time", "")
    return {
        "state": record.get("state", "never"),
        "valid_paths": valid if valid is not None else _int(record.get("valid")),
        "last_reconcile": (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(stamp)))
            if stamp.isdigit()
            else None
        ),
        "registration": None if record.get("registration", "-") == "-" else record["registration"],
        "invalidated": {
            "gone": _int(gone[0] if gone else None) or 0,
            "dependents": _int(dependents[0] if dependents else None) or 0,
            "paths": gone[1:] + dependents[1:],
        },
        "moved_aside": None if record.get("aside", "-") == "-" else record["aside"],
    }


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _count_now(state: int) -> int | None:
    """The valid paths of the database as it is now, counted on a private copy (nixcopy:
    SQLite never opens a file on RW); None when it cannot be counted."""
    try:
        import sqlite3

        from guest_agent.nixdb import copy as nixcopy
        from guest_agent.nixdb import database as nixdb
        from guest_agent.nixdb import schema as nixschema

        db = os.open(
            DB_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=state
        )
    except (ImportError, OSError):
        return None
    work = None
    with closing(db):
        try:
            work = nixcopy.take(db)
            if work is None:
                return None
            conn = nixdb.connect(work, nixschema.deadline())
            try:
                nixschema.check_schema(conn)
                return nixdb.count_valid(conn)
            finally:
                conn.close()
        except (nixfiles.NixDbError, sqlite3.Error, OSError):
            return None
        finally:
            nixcopy.discard(work)


def describe_line(info: dict[str, object]) -> str:
    """`status`'s words for `describe`'s dict."""
    if info["state"] == "never":
        return "Nix database: not reconciled yet"
    if info["state"] == "unreadable":
        return f"Nix database: state directory unreadable ({info.get('error')})"
    text = f"Nix database: {info['valid_paths']} valid paths"
    if info.get("last_reconcile"):
        text += f", last reconciled {info['last_reconcile']}"
        text += (
            f" against {info['registration']}" if info.get("registration") else " (no registration)"
        )
    if info["state"] == "reconciling":
        text += " (interrupted: the next boot reconciles again)"
    invalidated = info.get("invalidated")
    if isinstance(invalidated, dict) and (invalidated["gone"] or invalidated["dependents"]):
        text += (
            f"; it invalidated {invalidated['gone']} paths gone from the store and"
            f" {invalidated['dependents']} that depended on them"
        )
    if info.get("moved_aside"):
        text += f"; an unusable state directory was moved aside to RW/{info['moved_aside']}"
    return text

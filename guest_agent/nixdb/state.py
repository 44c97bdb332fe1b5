"""`x-nix-db`: Nix's state directory kept on RW, reconciled with the lower store at every boot.

RW/nix-state is bind-mounted at /nix/var/nix, outside the overlay (a database
copied up into the upper layer would shadow every later lower one). Before the
overlay is mounted, the agent

1. cleans the upper layer: whiteouts over registered paths are removed (a guest
   GC must not hide the lower store for good), and upper copies of registered
   paths the lower holds are moved to the trash (the lower copy is the
   registered one);
2. invalidates every valid path the store no longer holds, with its referrers;
3. registers what the registration lists and the database lacks;
4. records what it reconciled (`guest-agent-reconcile`), so that a boot whose
   lower, registration, upper layer and database are unchanged does nothing.

The database is data from a stranger: SQLite works on a private copy (copy.py)
checked against Nix's exact schema under time and memory bounds (schema.py), and
the result is written back whole. The record says `state reconciling` before
step 1, `writing-back` while the new file replaces the old, and `done` after
step 4: a power cut makes the next boot finish or undo the write-back and do the
rest again; each step is idempotent. A database the agent does not understand is
moved aside whole, never repaired or deleted; so is one whose reconcile failed
MAX_FAILURES boots in a row. No exception leaves `reconcile` but NixStateError
(and ImportError: no sqlite3 here; WrongType: RW/nix-state is not a directory).
Step 1 is upper.py, steps 2-3 database.py, run on the copy by steps.py; the record
is record.py; this module runs them in order on the layers' fds. See docs/nix-db.md.
"""

from __future__ import annotations

import os
import time

from guest_agent.kernel.syscalls import closing
from guest_agent.nixdb import files as nixfiles
from guest_agent.nixdb import record as nixrecord
from guest_agent.nixdb.files import RegistrationError
from guest_agent.nixdb.layers import Layers as Layers  # re-exported: reconcile's argument
from guest_agent.nixdb.layers import open_registration, read_registration
from guest_agent.records import NamedTuple
from guest_agent.reset import open_dir
from guest_agent.spec import NIX_STATE_DIR

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

    from guest_agent.kernel.mountinfo import Mount, MountTable
    from guest_agent.nixdb.database import Outcome

DB_DIR = nixrecord.DB_DIR
ASIDE_PREFIX = "nix-state.aside-"
MAX_FAILURES = 3  # boots in a row whose reconcile failed before the state is moved aside


NixStateError = nixfiles.NixDbError  # the reconcile could not run: why


class Report(NamedTuple):
    """What a boot's reconcile did, for the log lines and the record."""

    skipped: bool  # nothing changed since the last reconcile
    whiteouts: list[str]
    copies: list[str]
    outcome: Outcome | None
    aside: str | None  # where an unusable state directory was moved


def move_aside(rw: int) -> str:
    """Rename RW/nix-state out of the way (kept, never deleted); return its new name."""
    name = ASIDE_PREFIX + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    suffix = 0
    while True:
        candidate = name if suffix == 0 else f"{name}.{suffix}"
        try:
            os.stat(candidate, dir_fd=rw, follow_symlinks=False)
        except FileNotFoundError:
            break
        suffix += 1
    os.rename(NIX_STATE_DIR, candidate, src_dir_fd=rw, dst_dir_fd=rw)
    os.fsync(rw)
    return candidate


def _open_state(rw: int) -> tuple[int, int]:
    """fds of RW/nix-state and its db/ (made if missing); Unusable when db/ is not a directory."""
    from guest_agent.reset import WrongType

    state = open_dir(rw, NIX_STATE_DIR, create=True)
    try:
        return state, open_dir(state, DB_DIR, create=True)
    except (OSError, WrongType) as e:
        os.close(state)
        raise nixfiles.Unusable(f"{DB_DIR}: {e}") from None


def reconcile(layers: Layers, reg_info: str | None, say: Callable[[str], None]) -> Report:
    """Steps 1-4 on RW (the state directory is made if missing), telling SAY one line per
    change as it is made. Raises NixStateError with the reason (the failure is counted
    in the record), ImportError (no sqlite3) and WrongType (RW/nix-state is not a
    directory); nothing else escapes, and the database on RW is never half-written."""
    from guest_agent.reset import WrongType

    reg_fd, closure_info = -1, None
    if reg_info:
        try:
            reg_fd, closure_info = open_registration(layers.lower, reg_info)
        except (OSError, RegistrationError) as e:
            _no_registration(reg_info, e, say)
    try:
        return _reconcile(layers, reg_info, reg_fd, closure_info, say)
    except (ImportError, WrongType):
        raise
    except Exception as e:
        why = _why(e)
        _count_failure(layers.rw, why)
        raise NixStateError(why) from None
    finally:
        if reg_fd >= 0:
            os.close(reg_fd)


def _why(e: BaseException) -> str:
    if isinstance(e, nixfiles.NixDbError):
        return str(e)
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}"
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= 200 else text[:197] + "..."


def _count_failure(rw: int, why: str) -> None:
    """Note the failure in the record (best effort): MAX_FAILURES in a row move the state
    aside at the next boot, so that no database stops every boot the same way."""
    try:
        with closing(open_dir(rw, NIX_STATE_DIR, create=False)) as state:
            try:
                record = nixrecord.read_record(state)
            except nixfiles.Unusable:
                return
            failures = _int(record.get("failures")) + 1
            nixrecord.write_record(
                state, {**record, "state": "failed", "failures": f"{failures}", "error": why}
            )
    except Exception:
        pass


def _int(text: str | None) -> int:
    return int(text) if text is not None and text.isdigit() else 0


def _no_registration(reg_info: str | None, e: Exception, say: Callable[[str], None]) -> None:
    why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
    say(f"warning: registration {reg_info} unusable ({why}): nothing is registered")


def _reconcile(
    layers: Layers,
    reg_info: str | None,
    reg_fd: int,
    closure_info: str | None,
    say: Callable[[str], None],
) -> Report:
    """One attempt; when the state proves unusable, it is moved aside and a fresh one made
    (once: a fresh directory found unusable too is an error)."""
    aside = None
    while True:
        try:
            return _attempt(layers, reg_info, reg_fd, closure_info, aside, say)
        except nixfiles.Unusable as e:
            if aside is not None:
                raise NixStateError(f"a fresh state directory is unusable too: {e}") from None
            aside = _aside(layers.rw, e, say)


def _attempt(
    layers: Layers,
    reg_info: str | None,
    reg_fd: int,
    closure_info: str | None,
    aside: str | None,
    say: Callable[[str], None],
) -> Report:
    from guest_agent.nixdb import copy as nixcopy

    reg_stat = os.fstat(reg_fd) if reg_fd >= 0 else None
    state, db = _open_state(layers.rw)
    try:
        record = nixrecord.read_record(state)
        interrupted = record.get("new-db") if record.get("state") == "writing-back" else None
        note = nixcopy.recover(db, interrupted)
        if note:
            say(note)
        failures = _int(record.get("failures"))
        if failures >= MAX_FAILURES:
            raise nixfiles.Unusable(
                f"its reconcile failed {failures} boots in a row (last: {record.get('error', '?')})"
            )
        before = nixrecord.fingerprint(layers, reg_info, reg_stat, db)
        if record.get("state") == "done" and record.get("fingerprint") == before and aside is None:
            say(
                f"Nix database unchanged since the last boot ({record.get('valid', '?')} valid paths)"
            )
            return Report(True, [], [], None, None)
        say(f"reconciling the Nix database with the store ({nixrecord.changed(record, before)})")
        registration = None
        if reg_fd >= 0:
            try:
                os.lseek(reg_fd, 0, os.SEEK_SET)
                registration = read_registration(reg_fd)
            except (OSError, RegistrationError) as e:
                _no_registration(reg_info, e, say)
                closure_info = None
        from guest_agent.nixdb import (
            steps as nixsteps,  # only now: an unchanged boot does not pay for it
        )

        outcome, whiteouts, copies = nixsteps.reconcile_copy(
            layers, state, db, record, before, registration, closure_info, say
        )
        nixsteps.tell(outcome, say)
        after = nixrecord.fingerprint(layers, reg_info, reg_stat, db)
        nixrecord.write_record(
            state,
            {
                "state": "done",
                "fingerprint": after,
                "time": f"{int(time.time())}",
                "registration": reg_info or "-",
                "valid": f"{outcome.valid}",
                "added": f"{len(outcome.added)}",
                "gone": " ".join([f"{len(outcome.gone)}", *outcome.gone[:50]]),
                "dependents": " ".join([f"{len(outcome.dependents)}", *outcome.dependents[:50]]),
                "aside": aside or "-",
            },
        )
        return Report(False, whiteouts, copies, outcome, aside)
    finally:
        os.close(db)
        os.close(state)


def _aside(rw: int, why: Exception, say: Callable[[str], None]) -> str:
    moved = move_aside(rw)
    say(
        f"the Nix state directory was unusable ({why}): moved it aside to RW/{moved}, untouched,"
        " and started a fresh one"
    )
    return moved


def open_state(rw: int) -> int:
    """An fd of RW/nix-state (made if missing), for the bind mount at /nix/var/nix."""
    return open_dir(rw, NIX_STATE_DIR, create=True)


def state_mounts(table: MountTable, rw: int) -> list[Mount]:
    """The mounts showing RW/nix-state (the bind at /nix/var/nix): same filesystem, and a
    root that ends in /nix-state. A reset must not delete a database in use."""
    try:
        st = os.stat(NIX_STATE_DIR, dir_fd=rw, follow_symlinks=False)
    except OSError:
        return []
    dev = (os.major(st.st_dev), os.minor(st.st_dev))
    return [m for m in table.mounts if m.devnum == dev and m.root.endswith("/" + NIX_STATE_DIR)]

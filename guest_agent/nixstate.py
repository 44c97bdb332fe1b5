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

The record says `state reconciling` before step 1 and `state done` after step
4: a power cut in between makes the next boot do it all again, and each step
is idempotent (SQLite's transaction makes 2-3 all or nothing). A database the
agent does not understand is moved aside whole, never repaired or deleted.
Step 1 is nixupper.py, steps 2-3 nixdb.py, the record nixrecord.py; this module
runs them in order on the layers' fds. See docs/nix-db.md.
"""

from __future__ import annotations

import os
import stat
import time

from guest_agent import nixfiles, nixrecord, nixupper
from guest_agent.nixfiles import STORE_DIR, RegistrationError, store_name
from guest_agent.records import NamedTuple
from guest_agent.reset import open_dir
from guest_agent.spec import NIX_STATE_DIR
from guest_agent.syscalls import closing

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

    from guest_agent.mountinfo import Mount, MountTable
    from guest_agent.nixdb import Outcome
    from guest_agent.nixreg import Registration

DB_DIR = nixrecord.DB_DIR
ASIDE_PREFIX = "nix-state.aside-"
MAX_REGISTRATION = 256 << 20
MAX_DERIVATION = 16 << 20
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


NixStateError = nixfiles.NixDbError  # the reconcile could not run: why


class Report(NamedTuple):
    """What a boot's reconcile did, for the log lines and the record."""

    skipped: bool  # nothing changed since the last reconcile
    whiteouts: list[str]
    copies: list[str]
    outcome: Outcome | None
    aside: str | None  # where an unusable state directory was moved


class Layers:
    """The overlay's layers as the agent holds them: fds of LOWER, RW and RW/store."""

    def __init__(self, lower: int, rw: int, upper: int) -> None:
        self.lower = lower
        self.rw = rw
        self.upper = upper


def open_registration(lower: int, reg_info: str) -> tuple[int, str]:
    """An fd of the registration file REG_INFO (/nix/store/NAME/…), read from the lower
    layer itself, and NAME (its store path, not part of its own registration)."""
    name, _, rest = reg_info.removeprefix(STORE_DIR + "/").partition("/")
    store_name(f"{STORE_DIR}/{name}")
    if not reg_info.startswith(STORE_DIR + "/") or not rest or ".." in rest.split("/"):
        raise RegistrationError(f"{reg_info} names no file inside a store path")
    parent = os.path.dirname(rest)
    dir_fd = os.open(
        os.path.join(name, parent) if parent else name,
        os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
        dir_fd=lower,
    )
    with closing(dir_fd):
        fd = os.open(os.path.basename(rest), _READ_FLAGS, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RegistrationError(f"{reg_info} is not a regular file")
    return fd, name


def read_registration(fd: int) -> Registration:
    size = os.fstat(fd).st_size
    if size > MAX_REGISTRATION:
        raise RegistrationError(f"larger than {MAX_REGISTRATION >> 20} MiB")
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        if size < -MAX_REGISTRATION:
            raise RegistrationError(f"larger than {MAX_REGISTRATION >> 20} MiB")
    from guest_agent.nixreg import Registration

    return Registration(b"".join(chunks))


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


def _read_derivation(layers: Layers, upper: nixupper.Upper) -> Callable[[str], bytes | None]:
    def read(name: str) -> bytes | None:
        layer = layers.upper if name in upper.visible else layers.lower
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=layer)
        except OSError:
            return None
        with closing(fd):
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return os.read(fd, MAX_DERIVATION)

    return read


def reconcile(layers: Layers, reg_info: str | None, say: Callable[[str], None]) -> Report:
    """Steps 1-4 on RW (the state directory is made if missing), telling SAY one line per
    change as it is made. Raises OSError, WrongType, NixStateError, ImportError (no
    sqlite3) for the caller to report; the database is never left half-written."""
    reg_fd, closure_info = -1, None
    if reg_info:
        try:
            reg_fd, closure_info = open_registration(layers.lower, reg_info)
        except (OSError, RegistrationError) as e:
            _no_registration(reg_info, e, say)
    try:
        return _reconcile(layers, reg_info, reg_fd, closure_info, say)
    finally:
        if reg_fd >= 0:
            os.close(reg_fd)


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
    aside = None
    reg_stat = os.fstat(reg_fd) if reg_fd >= 0 else None
    try:
        state, db = _open_state(layers.rw)
    except nixfiles.Unusable as e:
        aside = _aside(layers.rw, e, say)
        state, db = _open_state(layers.rw)
    try:
        record = nixrecord.read_record(state)
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
                registration = read_registration(reg_fd)
            except (OSError, RegistrationError) as e:
                _no_registration(reg_info, e, say)
                closure_info = None
        import sqlite3  # only now: a boot with nothing to reconcile does not pay for it

        from guest_agent import nixdb

        try:
            conn = nixdb.open_database(
                db, check_integrity=not nixrecord.db_unchanged(record, before)
            )
        except nixfiles.Unusable as e:
            os.close(db)
            os.close(state)
            state = db = -1
            aside = _aside(layers.rw, e, say)
            state, db = _open_state(layers.rw)
            conn = None
        try:
            if conn is None:
                conn = nixdb.create_database(db)
            nixrecord.write_record(state, {**record, "state": "reconciling"})
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
                return name in upper.visible or (
                    name in lower_names and name not in upper.whiteouts
                )

            read = _read_derivation(layers, upper)
            names = len(registration.names) if registration is not None else 0
            say(f"checking the valid paths against the store and {names} registered paths")
            try:
                outcome = nixdb.reconcile(conn, present, registration, read, set(copies))
            except RegistrationError as e:  # an entry it had to parse in full is malformed
                _no_registration(reg_info, e, say)
                outcome = nixdb.reconcile(conn, present, None, read, set(copies))
        except sqlite3.Error as e:
            raise NixStateError(f"SQLite says {e}") from None
        finally:
            if conn is not None:
                conn.close()
        _tell(outcome, say)
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
        if db >= 0:
            os.close(db)
        if state >= 0:
            os.close(state)


def _aside(rw: int, why: Exception, say: Callable[[str], None]) -> str:
    moved = move_aside(rw)
    say(
        f"the Nix state directory was unusable ({why}): moved it aside to RW/{moved}, untouched,"
        " and started a fresh one"
    )
    return moved


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _tell(outcome: Outcome, say: Callable[[str], None]) -> None:
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

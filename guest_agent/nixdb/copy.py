"""Nix's database taken off RW into a private directory, and the result written back whole.

SQLite acts on names by itself: beside the file it is given it opens `-journal`
(replays a hot one, then reads and deletes the super-journal named inside it),
`-wal` and `-shm`. So SQLite never gets a name on RW. `take` reads `db.sqlite`
and `db.sqlite-wal` through fds (each looked at with O_PATH first: a regular file
of one link, within the size bounds) into a fresh directory of the agent's own on
a tmpfs (mkdtemp: mode 0700, a name nobody else knew); a hot rollback journal is
refused before anything is read. SQLite works on that copy, where every name is
the agent's.

`write_back` puts the result on RW as a new file, in an order a power cut cannot
mix: the copy (its WAL checkpointed into it) is written to `db.sqlite.guest-agent-new`
by fd and fsync'ed; the record notes that file's inode (`writing-back`); it is
renamed over `db.sqlite`; only then are the old `-wal` and `-shm` removed. A stale
`-wal` beside the new file would be replayed into it by SQLite, so `recover` (run
before anything else at the next boot) finishes the job when `db.sqlite` is the
noted inode, and otherwise drops the half-written new file: the old database and
its WAL are then untouched, together.
"""

from __future__ import annotations

import os

from guest_agent.nixdb import files as nixfiles
from guest_agent.nixdb.files import DB_FILE, JOURNAL_FILE, SHM_FILE, WAL_FILE, Unusable

MAX_DB = 1 << 30  # a 100 000-path store's database is ~100 MiB; a sparse 10 GiB file is refused
MAX_WAL = 512 << 20
NEW_FILE = DB_FILE + ".guest-agent-new"
# Private directories: /run is a tmpfs in every initrd; elsewhere the system's temporary one.
_PLACES = ("/run", None)


def private_dir() -> str:
    """A new directory only the agent knows (mode 0700), on a tmpfs where there is one."""
    import tempfile  # here, as shutil below: an unchanged boot runs only `recover`

    for place in _PLACES:
        try:
            return tempfile.mkdtemp(prefix="guest-agent-nixdb-", dir=place)
        except OSError:
            continue
    raise OSError("no private temporary directory could be made (/run, TMPDIR)")


def take(db_dir: int) -> str | None:
    """A private directory holding copies of RW's `db.sqlite` and `db.sqlite-wal`, None when
    there is no database. Unusable (the state is to be moved aside untouched) for a
    file that is not regular or has several links, a size past the bounds, or a
    rollback journal that holds anything."""
    if not nixfiles.check_files(db_dir):
        return None
    work = private_dir()
    try:
        for name, limit in ((DB_FILE, MAX_DB), (WAL_FILE, MAX_WAL)):
            src = nixfiles.open_owned(db_dir, name, limit)
            if src is None:
                continue
            try:
                _copy(src, os.path.join(work, name), limit, name)
            finally:
                os.close(src)
    except BaseException:
        discard(work)
        raise
    return work


def _copy(src: int, dst_path: str, limit: int, name: str) -> None:
    dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if _copy_fd(src, dst, limit) > limit:
            raise Unusable(f"{name} grew past the {limit} bytes allowed")
    finally:
        os.close(dst)


def _copy_fd(src: int, dst: int, limit: int | None = None) -> int:
    """Copy SRC to DST until SRC ends or more than LIMIT bytes were read; bytes copied."""
    copied = 0
    while limit is None or copied <= limit:
        chunk = os.read(src, 1 << 20)
        if not chunk:
            break
        copied += len(chunk)
        if limit is not None and copied > limit:
            break
        _write_all(dst, chunk)
    return copied


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def discard(work: str | None) -> None:
    if work is not None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def write_new(db_dir: int, work: str) -> int:
    """Write the private copy (checkpointed, closed by the caller) to NEW_FILE on RW,
    durably; return its inode for the record."""
    if os.path.exists(os.path.join(work, WAL_FILE)) and os.path.getsize(
        os.path.join(work, WAL_FILE)
    ):
        raise OSError("the private copy still has a WAL (not checkpointed)")
    if nixfiles.lstat_owned(db_dir, NEW_FILE) is not None:
        os.unlink(NEW_FILE, dir_fd=db_dir)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    dst = os.open(NEW_FILE, flags, 0o644, dir_fd=db_dir)
    try:
        src = os.open(os.path.join(work, DB_FILE), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _copy_fd(src, dst)
        finally:
            os.close(src)
        os.fsync(dst)
        inode = os.fstat(dst).st_ino
    finally:
        os.close(dst)
    os.fsync(db_dir)
    return inode


def put_in_place(db_dir: int) -> None:
    """NEW_FILE becomes `db.sqlite`; then the old database's WAL, shared memory and an
    empty journal go (in this order: see the module's docstring)."""
    os.rename(NEW_FILE, DB_FILE, src_dir_fd=db_dir, dst_dir_fd=db_dir)
    os.fsync(db_dir)
    _drop_stale(db_dir)


def _drop_stale(db_dir: int) -> None:
    for name in (WAL_FILE, SHM_FILE, JOURNAL_FILE):
        if nixfiles.lstat_owned(db_dir, name) is not None:
            os.unlink(name, dir_fd=db_dir)
    os.fsync(db_dir)


def recover(db_dir: int, new_inode: str | None) -> str | None:
    """Finish or undo a write-back a power cut interrupted (NEW_INODE: the record's note);
    returns what was done, for the log, or None when there was nothing to do."""
    try:
        current = nixfiles.lstat_owned(db_dir, DB_FILE)
    except Unusable:
        return None  # the checks that follow move such a state aside
    if new_inode and current is not None and f"{current.st_ino}" == new_inode:
        _drop_stale(db_dir)
        return "finished an interrupted write-back of the Nix database (the new file was in place)"
    if nixfiles.lstat_owned(db_dir, NEW_FILE) is not None:
        os.unlink(NEW_FILE, dir_fd=db_dir)
        os.fsync(db_dir)
        return "dropped a half-written copy of the Nix database (the old one is in place)"
    return None

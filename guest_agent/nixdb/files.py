"""The names of Nix's state files, the one writer of small files there, and the errors of
x-nix-db: what the record, the boot's fast path and the database code share, without
SQLite (a boot with nothing to reconcile imports only this, nixlayers, nixrecord and
nixcopy besides nixstate). The lowest of the family: it imports none of it.
"""

from __future__ import annotations

import os
import stat

STORE_DIR = "/nix/store"
_NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's alphabet: no e, o, u, t
_BASE32_SET = frozenset(_NIX_BASE32)
# Characters Nix allows in a store path name (after the 32-char hash and '-').
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")
DB_DIR = "db"
DB_FILE = "db.sqlite"
SCHEMA_FILE = "schema"
WAL_FILE = DB_FILE + "-wal"
SHM_FILE = DB_FILE + "-shm"
JOURNAL_FILE = DB_FILE + "-journal"
DB_FILES = (DB_FILE, WAL_FILE, SHM_FILE, JOURNAL_FILE)


class NixDbError(Exception):
    """The Nix database could not be reconciled: why."""


class Unusable(NixDbError):
    """The database cannot be used as it is (why): it is to be moved aside, untouched."""


def check_files(db_dir: int) -> bool:
    """Whether the database file exists; Unusable when one of its files is not a plain file
    of one link, or when a rollback journal holds anything (Nix keeps its database in WAL
    mode: a hot journal is not Nix's, and SQLite would replay it and follow the
    super-journal it names)."""
    exists = False
    for name in DB_FILES:
        st = lstat_owned(db_dir, name)
        if st is None:
            continue
        if name == JOURNAL_FILE and st.st_size:
            raise Unusable(f"{name} is a rollback journal ({st.st_size} bytes), not Nix's WAL")
        exists = exists or name == DB_FILE
    return exists


def lstat_owned(dir_fd: int, name: str, max_size: int | None = None) -> os.stat_result | None:
    """NAME's stat (never followed), None when absent; Unusable unless it is a regular file
    with one link (a hard link would let a write reach a file outside RW) of at most
    MAX_SIZE bytes."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    _check_regular(name, st, max_size)
    return st


def _check_regular(
    name: str, st: os.stat_result, max_size: int | None, *, links_ok: bool = False
) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Unusable(f"{name} is not a regular file")
    if st.st_nlink != 1 and not links_ok:
        raise Unusable(f"{name} has {st.st_nlink} hard links")
    if max_size is not None and st.st_size > max_size:
        raise Unusable(f"{name} has {st.st_size} bytes, more than the {max_size} allowed")


def open_owned(dir_fd: int, name: str, max_size: int, *, links_ok: bool = False) -> int | None:
    """A readable fd of NAME in DIR_FD, None when absent (Unusable as `lstat_owned`;
    LINKS_OK for a store file, which `nix-store --optimise` may have hard-linked).

    The file is looked at before it is opened: an O_PATH fd (no device's open runs, no
    FIFO blocks, no link is followed) is fstat'ed, and only a regular file is then
    reopened for reading through it (the same inode, whatever is renamed meanwhile)."""
    try:
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        _check_regular(name, os.fstat(path_fd), max_size, links_ok=links_ok)
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


def read_owned(dir_fd: int, name: str, max_size: int) -> bytes | None:
    """NAME's bytes (see `open_owned`), None when absent; Unusable past MAX_SIZE."""
    fd = open_owned(dir_fd, name, max_size)
    if fd is None:
        return None
    try:
        data = read_fd(fd, max_size + 1)
    finally:
        os.close(fd)
    if len(data) > max_size:
        raise Unusable(f"{name} grew past the {max_size} bytes allowed")
    return data


def read_fd(fd: int, limit: int) -> bytes:
    """At most LIMIT bytes of FD, read to its end."""
    chunks, left = [], limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def write_small_file(dir_fd: int, name: str, data: bytes) -> None:
    """Replace NAME in DIR_FD with DATA, atomically and durably (never through a link).
    Unusable when NAME, or the temporary name beside it, is something the agent does
    not write there (a directory, a FIFO, a file of several links)."""
    tmp = f".{name}.guest-agent-tmp"
    lstat_owned(dir_fd, name)
    if lstat_owned(dir_fd, tmp) is not None:
        os.unlink(tmp, dir_fd=dir_fd)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


class RegistrationError(ValueError):
    pass


def store_name(path: str) -> str:
    """The base name of the store path PATH (/nix/store/NAME), checked as Nix would."""
    name = path.removeprefix(STORE_DIR + "/")
    if name == path or not is_store_name(name):
        raise RegistrationError(f"{path!r} is not a path in {STORE_DIR}")
    return name


def is_store_name(name: str) -> bool:
    """Whether NAME is a store path's base name: 32 base-32 chars, '-', a name."""
    return (
        33 < len(name) <= 211
        and name[32] == "-"
        and _BASE32_SET.issuperset(name[:32])
        and _NAME_CHARS.issuperset(name[33:])
        and name[33] != "."
    )

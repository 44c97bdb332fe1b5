"""The names of Nix's state files, the one writer of small files there, and the errors of
x-nix-db: what the record, the boot's fast path and the database code share, without
SQLite (a boot with nothing to reconcile imports only this, nixrecord and nixupper).
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
DB_FILES = (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm", DB_FILE + "-journal")


class NixDbError(Exception):
    """The Nix database could not be reconciled: why."""


class Unusable(NixDbError):
    """The database cannot be used as it is (why): it is to be moved aside, untouched."""


def check_files(db_dir: int) -> bool:
    """Whether the database file exists; Unusable when one of its files is not a plain file."""
    exists = False
    for name in DB_FILES:
        try:
            st = os.stat(name, dir_fd=db_dir, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise Unusable(f"{name} is not a regular file")
        exists = exists or name == DB_FILE
    return exists


def write_small_file(dir_fd: int, name: str, data: bytes) -> None:
    """Replace NAME in DIR_FD with DATA, atomically and durably (never through a link)."""
    tmp = f".{name}.guest-agent-tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
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

"""Wiping the store overlay's upper layer without ever exposing a half-deleted one.

A reset renames RW/store and RW/work into RW/.guest-agent-trash/ (two atomic
renames on the same filesystem, made durable with fsync), so that its cost
does not depend on how much the upper layer holds. A power cut leaves either
the old upper layer whole or none at all (an empty one is made on the next
mount). The trash is deleted afterwards, outside the boot's critical path;
whatever an interrupted deletion left is deleted at the next mount.

RW's contents are a stranger's data: every name here is reached relative to
an fd of RW (`rw` below is always such an fd), created with O_NOFOLLOW, and a
name of the agent's that exists with the wrong type (a symlink, a file where a
directory belongs) raises `WrongType`: it is never followed nor deleted.
"""

from __future__ import annotations

import errno
import os
import stat
import time

from guest_agent.kernel.paths import OWNED_DIR_FLAGS, kind_of
from guest_agent.kernel.syscalls import closing
from guest_agent.spec import LAYERS, NIX_STATE_DIR, WORK_DIR

TRASH = ".guest-agent-trash"
REQUEST = ".guest-agent-reset-requested"


class WrongType(Exception):
    """A name the agent owns on RW exists as something else than the agent makes there."""

    def __init__(self, name: str, found: str, wanted: str) -> None:
        super().__init__(f"{name} is {found}, not {wanted}")
        self.name = name
        self.found = found


def _mode_at(rw: int, name: str) -> int | None:
    try:
        return os.stat(name, dir_fd=rw, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def check_dir(rw: int, name: str) -> bool:
    """Whether NAME exists as a real directory in RW (WrongType if it exists as anything else)."""
    mode = _mode_at(rw, name)
    if mode is None:
        return False
    if not stat.S_ISDIR(mode):
        raise WrongType(name, kind_of(mode), "a directory")
    return True


def open_dir(rw: int, name: str, *, create: bool) -> int:
    """A readable fd of the directory NAME in RW, made first if CREATE (mode 0755)."""
    if create:
        try:
            os.mkdir(name, 0o755, dir_fd=rw)
        except FileExistsError:
            pass
    try:
        return os.open(name, OWNED_DIR_FLAGS, dir_fd=rw)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            mode = _mode_at(rw, name)
            raise WrongType(name, kind_of(mode) if mode else "gone", "a directory") from None
        raise


def request_pending(rw: int) -> bool:
    """Whether a reset was scheduled; WrongType if REQUEST is not a regular file."""
    mode = _mode_at(rw, REQUEST)
    if mode is None:
        return False
    if not stat.S_ISREG(mode):
        raise WrongType(REQUEST, kind_of(mode), "a regular file")
    return True


def schedule(rw: int) -> None:
    """Record a reset request on the RW volume, durably; the next mount-all consumes it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(REQUEST, flags, 0o600, dir_fd=rw)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ETXTBSY):
            mode = _mode_at(rw, REQUEST)
            raise WrongType(REQUEST, kind_of(mode) if mode else "gone", "a regular file") from None
        raise
    with closing(fd):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            found = (
                "a hard link to another file" if stat.S_ISREG(st.st_mode) else kind_of(st.st_mode)
            )
            raise WrongType(REQUEST, found, "a regular file")
        os.ftruncate(fd, 0)
        os.write(fd, f"requested at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
        os.fsync(fd)
    os.fsync(rw)


def check_names(rw: int, *, resetting: bool, nix_db: bool = False) -> list[WrongType]:
    """Every name of the agent's on RW that has the wrong type.

    The layers and the request must be right for any mount (and the Nix state
    directory for an x-nix-db overlay); the trash only for a reset (otherwise a
    wrong trash is left alone and reported by the caller).
    """
    wrong = []
    names: list[tuple[str, bool]] = [(name, True) for name in _layers(nix_db)]
    names.append((TRASH, resetting))
    for name, fatal in names:
        try:
            check_dir(rw, name)
        except WrongType as e:
            if fatal:
                wrong.append(e)
    try:
        request_pending(rw)
    except WrongType as e:
        wrong.append(e)
    return wrong


def _layers(nix_db: bool) -> tuple[str, ...]:
    return (*LAYERS, NIX_STATE_DIR) if nix_db else LAYERS


def move_aside(rw: int, *, nix_db: bool = False) -> int:
    """Move the upper and work dirs (and with NIX_DB the Nix state directory) into the
    trash; return how many were moved.

    The caller has checked the names (`check_names`); a name swapped for a link
    since then is moved as a link, never followed. The request file (if any) is
    removed only once the move is durable, so a power cut in between repeats the
    (by then empty) reset instead of losing it.

    On a full volume (no block left for a new directory) the upper dir itself is
    renamed into place as the trash, and a work dir that cannot be moved is
    deleted (it is overlayfs's scratch space, never the user's data).
    """
    stamp = f"{time.time_ns()}"
    moved = 0
    try:
        trash = open_dir(rw, TRASH, create=True)
    except OSError as e:
        if e.errno != errno.ENOSPC or not check_dir(rw, LAYERS[0]):
            raise
        os.rename(LAYERS[0], TRASH, src_dir_fd=rw, dst_dir_fd=rw)  # its entries are the trash's
        moved += 1
        trash = open_dir(rw, TRASH, create=False)
    with closing(trash):
        for name in _layers(nix_db):
            if _mode_at(rw, name) is None:
                continue
            try:
                os.rename(name, f"{stamp}-{name}", src_dir_fd=rw, dst_dir_fd=trash)
            except OSError as e:
                if e.errno != errno.ENOSPC or name != WORK_DIR:
                    raise
                delete_tree(rw, name)
            moved += 1
        os.fsync(trash)
    os.fsync(rw)
    if _mode_at(rw, REQUEST) is not None:
        os.unlink(REQUEST, dir_fd=rw)
        os.fsync(rw)
    return moved


def open_trash(rw: int) -> int | None:
    """A readable fd of the trash when it holds something, else None (WrongType if it is
    not a directory)."""
    if not check_dir(rw, TRASH):
        return None
    fd = open_dir(rw, TRASH, create=False)
    with os.scandir(fd) as entries:
        if next(entries, None) is not None:
            return fd
    os.close(fd)
    return None


def empty_trash(trash: int) -> None:
    """Delete everything in the trash TRASH (an fd), synchronously; what fails is left for
    the next time."""
    with os.scandir(trash) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        delete_tree(trash, name)


def delete_tree(parent: int, name: str) -> None:
    """rm -rf NAME in the directory PARENT, never following a symlink: each directory is
    opened with O_NOFOLLOW relative to the one above it. Best effort."""
    # A stack of (fd of a directory, its name in the one below, names left to delete in it).
    stack: list[tuple[int, str, list[str]]] = []
    try:
        fd = os.open(name, OWNED_DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            _unlink(parent, name)
        return
    stack.append((fd, name, _names(fd)))
    try:
        while stack:
            fd, dirname, left = stack[-1]
            if not left:
                stack.pop()
                os.close(fd)
                above = stack[-1][0] if stack else parent
                try:
                    os.rmdir(dirname, dir_fd=above)
                except OSError:
                    pass
                continue
            entry = left.pop()
            try:
                child = os.open(entry, OWNED_DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    _unlink(fd, entry)
                continue  # gone, or too deep for our fds: left for the next time
            stack.append((child, entry, _names(child)))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def _names(fd: int) -> list[str]:
    try:
        with os.scandir(fd) as entries:
            return [entry.name for entry in entries]
    except OSError:
        return []


def _unlink(parent: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=parent)
    except OSError:
        pass


def empty_trash_in_background(trash: int) -> int | None:
    """Fork a detached process that empties the trash TRASH (an fd); return its pid (None
    if fork failed).

    The child keeps the trash's fd, so the deletion goes on even after an initrd
    moves the mount to the real root.
    """
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid:
        os.waitpid(pid, 0)  # the intermediate child exits at once
        return pid
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        try:
            os.nice(10)
        except OSError:
            pass
        if trash != 3:
            os.dup2(trash, 3)  # first: TRASH may be 0-2 if the agent ran with stdio closed
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        # Inherited descriptors (the agent's run lock above all, /dev/kmsg, the uevent
        # socket) would otherwise stay open, and the lock held, until the deletion ends.
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))
        empty_trash(3)
    finally:
        os._exit(0)

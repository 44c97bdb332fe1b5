"""Wiping the store overlay's upper layer without ever exposing a half-deleted one.

A reset renames RW/store and RW/work into RW/.guest-agent-trash/ (two atomic
renames on the same filesystem, made durable with fsync), so that its cost
does not depend on how much the upper layer holds. A power cut leaves either
the old upper layer whole or none at all (an empty one is made on the next
mount). The trash is deleted afterwards, outside the boot's critical path;
whatever an interrupted deletion left is deleted at the next mount.
"""

from __future__ import annotations

import errno
import os
import time

TRASH = ".guest-agent-trash"
REQUEST = ".guest-agent-reset-requested"
LAYERS = ("store", "work")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def request_pending(rw: str) -> bool:
    return os.path.lexists(os.path.join(rw, REQUEST))


def schedule(rw: str) -> None:
    """Record a reset request on the RW volume, durably; the next mount-all consumes it."""
    path = os.path.join(rw, REQUEST)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"requested at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(rw)


def move_aside(rw: str) -> int:
    """Move the upper and work dirs into the trash; return how many were moved.

    The request file (if any) is removed only once the move is durable, so a
    power cut in between repeats the (by then empty) reset instead of losing it.

    On a full volume (no block left for a new directory) the upper dir itself is
    renamed into place as the trash, and a work dir that cannot be moved is
    deleted (it is overlayfs's scratch space, never the user's data).
    """
    trash = os.path.join(rw, TRASH)
    stamp = f"{time.time_ns()}"
    moved = 0
    try:
        os.makedirs(trash, mode=0o700, exist_ok=True)
    except OSError as e:
        upper = os.path.join(rw, LAYERS[0])
        if e.errno != errno.ENOSPC or not os.path.isdir(upper) or os.path.islink(upper):
            raise
        os.rename(upper, trash)  # its entries are the trash's now
        moved += 1
    for name in LAYERS:
        src = os.path.join(rw, name)
        if not os.path.lexists(src):
            continue
        try:
            os.rename(src, os.path.join(trash, f"{stamp}-{name}"))
        except OSError as e:
            if e.errno != errno.ENOSPC or name != "work":
                raise
            import shutil

            shutil.rmtree(src)
        moved += 1
    _fsync_dir(trash)
    _fsync_dir(rw)
    request = os.path.join(rw, REQUEST)
    if os.path.lexists(request):
        os.unlink(request)
        _fsync_dir(rw)
    return moved


def trash_pending(rw: str) -> bool:
    trash = os.path.join(rw, TRASH)
    try:
        return bool(os.listdir(trash))
    except OSError:
        return False


def empty_trash(rw: str) -> None:
    """Delete everything in the trash (synchronously); what fails is retried next time."""
    trash = os.path.join(rw, TRASH)
    try:
        entries = os.listdir(trash)
    except OSError:
        return
    for entry in entries:
        path = os.path.join(trash, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil  # only when there is something to delete

            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def empty_trash_in_background(rw: str) -> int | None:
    """Fork a detached process that empties the trash; return its pid (None if fork failed).

    The child keeps a descriptor of RW open (via chdir), so the deletion goes on
    even after an initrd moves the mount to the real root.
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
        os.chdir(rw)
        try:
            os.nice(10)
        except OSError:
            pass
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        # Inherited descriptors (the agent's run lock above all, /dev/kmsg, the uevent
        # socket) would otherwise stay open, and the lock held, until the deletion ends.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        empty_trash(".")
    finally:
        os._exit(0)

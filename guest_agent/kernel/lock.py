"""The run lock: two runs on one target root must not mount the same things at once."""

from __future__ import annotations

import os

LOCK_TIMEOUT = 120


def lock_name(root: str) -> str:
    """The run lock of a target root: an abstract unix socket name keyed by the root's identity."""
    st = os.stat(root)
    return f"\0guest-agent/{st.st_dev}:{st.st_ino}"


class LockFailed(Exception):
    """The run lock could not be taken: the message says why (one line)."""


def lock(root: str, timeout: float | None = None) -> int:
    """Serialise runs on one root (two at once must not mount twice); return the lock's fd.

    The lock is an abstract AF_UNIX socket name (`@guest-agent/DEV:INO`, from the
    root's st_dev and st_ino): binding it needs no writable filesystem, only one
    process can hold it, and the kernel releases it when that process exits. A
    run waits for the holder up to TIMEOUT seconds (default LOCK_TIMEOUT), then gives up (LockFailed)
    instead of hanging the boot. It never runs unlocked: when the socket cannot
    even be made, that is LockFailed too. The fd is close-on-exec.
    """
    import _socket as socket  # the C module: `socket` imports enum, selectors...
    import errno
    import time

    timeout = LOCK_TIMEOUT if timeout is None else timeout
    try:
        name = lock_name(root)
    except OSError as e:
        raise LockFailed(f"cannot name the run lock of {root!r}: {e.strerror or e}") from None
    shown = "@" + name[1:]
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as e:
        raise LockFailed(f"cannot make the run lock {shown}: {e.strerror or e}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.bind(name)
            return int(sock.detach())
        except OSError as e:
            if e.errno not in (errno.EADDRINUSE, errno.EINTR):
                sock.close()
                raise LockFailed(f"cannot take the run lock {shown}: {e.strerror or e}") from None
        if time.monotonic() >= deadline:
            sock.close()
            raise LockFailed(f"another guest-agent run has held the lock {shown} for {timeout:g} s")
        time.sleep(0.03)

"""The old mount interface: mount(2) and umount2(2), called through libc.

Their numbers differ between architectures, so libc makes them (guest_agent.kernel.syscalls
makes the numbered calls). A leaf: it imports nothing of the agent, and
guest_agent.kernel.mount imports it only to unmount, to bind-mount, or to mount on a kernel
without the new mount API (Linux < 5.2), so a boot that mounts everything with that API
never imports it. Both raise OSError; kernel.mount turns that into MountError.
"""

from __future__ import annotations

import ctypes
import os

# The running program's symbols, libc among them (imported only to call it: no lazy load).
_libc = ctypes.CDLL(None, use_errno=True)


def _checked(result: int, target: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def mount2(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2); OSError naming TARGET."""
    fs = os.fsencode
    _checked(_libc.mount(fs(source), fs(target), fs(fstype), flags, fs(data)), target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2); OSError naming TARGET."""
    _checked(_libc.umount2(os.fsencode(target), flags), target)

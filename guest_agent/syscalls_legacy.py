"""The old mount interface: mount(2) and umount2(2), called through libc.

Their numbers differ between architectures, so libc makes them (guest_agent.syscalls
makes the numbered calls). Imported only to unmount, or to mount on a kernel without
the new mount API (Linux < 5.2): a boot that mounts everything with that API never
imports this module. `umount()` turns the kernel's refusal into MountError.
"""

from __future__ import annotations

import os

from guest_agent.syscalls import SB_FLAGS, MountError, MountRequest, checked, libc, split_options

_MS_RDONLY = 0x1
_MS_BIND = 0x1000


def mount2(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2); OSError naming TARGET."""
    fs = os.fsencode
    checked(libc().mount(fs(source), fs(target), fs(fstype), flags, fs(data)), target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2); OSError naming TARGET."""
    checked(libc().umount2(os.fsencode(target), flags), target)


def mount_legacy(req: MountRequest) -> None:
    """REQ with mount(2), for kernels without the new mount API; MountError if refused."""
    _, flags, sb_flags, data = split_options(req.options)
    for flag in sb_flags:
        flags |= _MS_RDONLY if flag == "ro" else SB_FLAGS[flag]
    try:
        mount2(req.source, req.target, req.fstype, flags, ",".join(data))
    except OSError as e:
        raise MountError(e.errno or 0, "mount") from None


def bind(req: MountRequest) -> None:
    """A bind mount of the directory REQ.source (a /proc/self/fd/N of a directory the agent
    holds) onto REQ.target_fd (or REQ.target); MountError if refused."""
    target = req.target if req.target_fd is None else f"/proc/self/fd/{req.target_fd}"
    try:
        mount2(req.source, target, "", _MS_BIND, "")
    except OSError as e:
        raise MountError(e.errno or 0, "mount") from None

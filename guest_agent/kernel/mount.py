"""Mounting: a `MountRequest` made with the new mount API, or with mount(2) where the
kernel has none, and unmounting; the kernel's refusal becomes `MountError`.

The new mount API (fsopen/fsconfig/fsmount/move_mount, Linux >= 5.2, through
guest_agent.kernel.syscalls) is used first because the kernel then tells *why* it
refused (read from the fs context fd), not just an errno. Kernels without it fall
back to mount(2). The old interface, mount(2) and umount2(2) through libc, is
guest_agent.kernel.syscalls_legacy (a leaf), imported only when used: a boot that
mounts with the new API and unmounts nothing never imports it. The options split
here (`split_options`) into per-mount attributes, superblock flags and the
filesystem's own data.
"""

from __future__ import annotations

import errno
import os

from guest_agent.kernel.syscalls import closing, fsconfig, fsmount, fsopen, move_mount
from guest_agent.records import NamedTuple

_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_AT_FDCWD = -100

# Per-mount attributes (fsmount) and their mount(2) flag equivalents.
MOUNT_ATTRS = {
    "ro": (0x1, 0x1),  # MOUNT_ATTR_RDONLY, MS_RDONLY
    "nosuid": (0x2, 0x2),
    "nodev": (0x4, 0x4),
    "noexec": (0x8, 0x8),
    "noatime": (0x10, 0x400),
    "strictatime": (0x20, 0x1000000),
    "nodiratime": (0x80, 0x800),
    "relatime": (0x0, 0x200000),
}
# Options that cancel the ones above.
CANCELS = {
    "rw": "ro",
    "suid": "nosuid",
    "dev": "nodev",
    "exec": "noexec",
    "atime": "noatime",
    "diratime": "nodiratime",
}
_ATIME_MODES = ("noatime", "strictatime", "relatime")
# Superblock flags the VFS parses itself (given to fsconfig as flags).
SB_FLAGS = {"sync": 0x10, "dirsync": 0x80, "lazytime": 0x2000000, "mand": 0x40}
# Accepted by mount(8) but meaning nothing to the kernel here (or the default already).
NO_OPS = frozenset(
    {"async", "nolazytime", "nomand", "loud", "silent", "norelatime", "nostrictatime"}
)
BIND = "bind"  # MountRequest.fstype of a bind mount (made with mount(2))
_MS_RDONLY = 0x1  # mount(2)'s flags (the old interface, guest_agent.kernel.syscalls_legacy)
_MS_BIND = 0x1000
_MNT_DETACH = 0x2


class MountError(Exception):
    """The kernel refused a mount (or unmount): its errno, the step that failed (an option,
    "fsmount", "move_mount", "mount", "umount", ...) and what it logged on the fs context."""

    def __init__(self, err: int, step: str, kernel_says: str = "") -> None:
        self.errno = err
        self.step = step
        self.kernel_says = kernel_says
        reason = os.strerror(err)
        super().__init__(f"{reason}: {kernel_says}" if kernel_says else reason)


class MountRequest(NamedTuple):
    fstype: str
    source: str
    target: str  # host path, already resolved and checked
    options: tuple[str, ...] = ()  # kernel options as given (flags are picked out here)
    target_fd: int | None = None  # an O_PATH fd of the target: mount onto it, not onto a path


def split_options(options: tuple[str, ...]) -> tuple[int, int, list[str], list[str]]:
    """Split options into (mount attrs, mount(2) flags, superblock flags, filesystem data)."""
    wanted: dict[str, bool] = {}
    sb_flags: list[str] = []
    data: list[str] = []
    for opt in options:
        if opt in _ATIME_MODES:
            # One access-time mode at most (fsmount refuses two with EINVAL): the last wins.
            for mode in _ATIME_MODES:
                wanted.pop(mode, None)
            wanted[opt] = True
        elif opt in MOUNT_ATTRS:
            wanted[opt] = True
        elif opt in CANCELS:
            wanted[CANCELS[opt]] = False
        elif opt in SB_FLAGS:
            sb_flags.append(opt)
        elif opt in NO_OPS:
            continue
        else:
            data.append(opt)
    attrs = flags = 0
    for name, on in wanted.items():
        if on:
            attrs |= MOUNT_ATTRS[name][0]
            flags |= MOUNT_ATTRS[name][1]
    if wanted.get("ro"):
        sb_flags.insert(0, "ro")
    return attrs, flags, sb_flags, data


def _drain_messages(fd: int) -> str:
    """Read what the kernel logged on the fs context ("e overlayfs: ..." lines)."""
    lines = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        text = chunk.decode(errors="replace").strip()
        lines.append(text[2:] if text[:2] in ("e ", "w ", "i ") else text)
    return "; ".join(lines)


def mount(request: MountRequest) -> None:
    """REQUEST with the new mount API, or with mount(2) on a kernel without it; a bind
    mount always with mount(2). MountError if the kernel refuses."""
    if request.fstype == BIND:
        # REQUEST.source: a /proc/self/fd/N of a directory the agent holds
        fd = request.target_fd
        target = request.target if fd is None else f"/proc/self/fd/{fd}"
        _mount_legacy(request.source, target, "", _MS_BIND, "")
        return
    try:
        _mount_new_api(request)
    except _NoNewApi:
        _, flags, sb_flags, data = split_options(request.options)
        for flag in sb_flags:
            flags |= _MS_RDONLY if flag == "ro" else SB_FLAGS[flag]
        _mount_legacy(request.source, request.target, request.fstype, flags, ",".join(data))


def _mount_legacy(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) (guest_agent.kernel.syscalls_legacy, imported now); MountError if refused."""
    from guest_agent.kernel.syscalls_legacy import mount2

    try:
        mount2(source, target, fstype, flags, data)
    except OSError as e:
        raise MountError(e.errno or 0, "mount") from None


class _NoNewApi(Exception):
    pass


def _mount_new_api(req: MountRequest) -> None:
    attrs, _, sb_flags, data = split_options(req.options)
    try:
        fs_fd = fsopen(req.fstype)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise _NoNewApi from None
        raise MountError(e.errno or 0, "fsopen") from None
    with closing(fs_fd):
        step = "source"
        try:
            fsconfig(fs_fd, _FSCONFIG_SET_STRING, "source", req.source)
            for flag in sb_flags:
                step = flag
                fsconfig(fs_fd, _FSCONFIG_SET_FLAG, flag)
            for opt in data:
                step = opt
                key, sep, value = opt.partition("=")
                if sep:
                    fsconfig(fs_fd, _FSCONFIG_SET_STRING, key, value)
                else:
                    fsconfig(fs_fd, _FSCONFIG_SET_FLAG, key)
            step = "create"
            fsconfig(fs_fd, _FSCONFIG_CMD_CREATE)
        except OSError as e:
            said = _drain_messages(fs_fd)
            where = "" if step == "create" else f"option {step!r}"
            raise MountError(e.errno or 0, where, said) from None
        try:
            mnt_fd = fsmount(fs_fd, attrs)
        except OSError as e:
            raise MountError(e.errno or 0, "fsmount", _drain_messages(fs_fd)) from None
    if req.target_fd is not None:
        to_fd, to_path = req.target_fd, ""
        flags = _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH
    else:
        to_fd, to_path, flags = _AT_FDCWD, req.target, _MOVE_MOUNT_F_EMPTY_PATH
    with closing(mnt_fd):
        try:
            move_mount(mnt_fd, to_fd, to_path, flags)
        except OSError as e:
            raise MountError(e.errno or 0, "move_mount") from None


def umount(target: str, *, lazy: bool = False) -> None:
    """umount2(2) (guest_agent.kernel.syscalls_legacy); MountError if the kernel refuses."""
    from guest_agent.kernel.syscalls_legacy import umount2

    try:
        umount2(target, _MNT_DETACH if lazy else 0)
    except OSError as e:
        raise MountError(e.errno or 0, "umount") from None

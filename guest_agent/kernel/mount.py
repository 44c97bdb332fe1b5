"""The agent's one door to the kernel's system calls: ctypes, errors raised as OSError.

`syscall()` calls one by number and raises OSError(errno, strerror, filename)
when it fails; the thin wrappers below (the mount API, openat2) are built on it
(finit_module and init_module are guest_agent.kmod.image's); `closing` closes an fd when a block
ends. `mount()` and `umount()` turn the kernel's refusal into MountError. The
old mount interface, mount(2) and umount2(2) through libc, is
guest_agent.kernel.syscalls_legacy (a leaf, below this module), imported only when used:
a boot that mounts with the new API and unmounts nothing never imports it.

The new mount API (fsopen/fsconfig/fsmount/move_mount, Linux >= 5.2) is used
first because the kernel then tells *why* it refused (read from the fs context
fd), not just an errno. Kernels without it fall back to mount(2).
"""

from __future__ import annotations

import errno
import os

from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import ctypes  # imported when the first system call is made: not for a dry run

# Identical on x86_64, aarch64, riscv64 and every other architecture using the unified table.
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432

_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_FLAG = 0
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_AT_FDCWD = -100
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02  # openat2's resolve flags
RESOLVE_IN_ROOT = 0x10

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


_libc: ctypes.CDLL | None = None
_syscall: ctypes._NamedFuncPointer | None = None
_NO_ARGS = (0, 0, 0, 0, 0, 0)  # syscall(2) reads six arguments; the kernel ignores unused ones


def libc() -> ctypes.CDLL:
    """The C library, loaded once, errno kept after each call (ctypes.get_errno)."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _raw_syscall() -> ctypes._NamedFuncPointer:
    """libc's syscall(2) with its prototype set once: NR as a long, six arguments as
    pointer-sized values (an int is passed as a 64-bit value, negative ones too; bytes as
    a pointer to their buffer; None as NULL), the result as a long. Converting in C, once
    per call, costs less than building argument objects in Python (bench/analysis.md)."""
    global _syscall
    if _syscall is None:
        import ctypes

        fn = libc()["syscall"]  # a function object of its own: libc().syscall stays untyped
        fn.restype = ctypes.c_long
        fn.argtypes = (ctypes.c_long, *(ctypes.c_void_p,) * len(_NO_ARGS))
        _syscall = fn
    return _syscall


def checked(result: int, filename: str | None) -> int:
    """RESULT of a C call that sets errno; OSError(errno, strerror, FILENAME) when negative."""
    if result < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), filename)
    return result


def syscall(nr: int, *args: int | bytes | None, filename: str | None = None) -> int:
    """syscall(2) NR with up to six ARGS (ints, bytes passed as pointers to their buffer,
    None as NULL); its result, or OSError(errno, strerror, FILENAME)."""
    result: int = _raw_syscall()(nr, *args, *_NO_ARGS[len(args) :])
    return checked(result, filename)


class closing:
    """`with closing(fd):` closes the fd FD when the block ends, however it ends."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)


# --- thin wrappers: one system call each, OSError on failure ---------------------------


def fsopen(fstype: str) -> int:
    return syscall(_SYS_FSOPEN, os.fsencode(fstype), _FSOPEN_CLOEXEC)


def fsconfig(fs_fd: int, cmd: int, key: str | None = None, value: str | None = None) -> None:
    key_b = None if key is None else os.fsencode(key)
    value_b = None if value is None else os.fsencode(value)
    syscall(_SYS_FSCONFIG, fs_fd, cmd, key_b, value_b, 0)


def fsmount(fs_fd: int, attrs: int) -> int:
    return syscall(_SYS_FSMOUNT, fs_fd, _FSMOUNT_CLOEXEC, attrs)


def move_mount(from_fd: int, to_fd: int, to_path: str, flags: int) -> None:
    syscall(_SYS_MOVE_MOUNT, from_fd, b"", to_fd, os.fsencode(to_path), flags)


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    import ctypes

    how = (ctypes.c_uint64 * 3)(flags, 0, resolve)  # struct open_how {flags, mode, resolve}
    address, size = ctypes.addressof(how), ctypes.sizeof(how)
    return syscall(_SYS_OPENAT2, dir_fd, os.fsencode(path), address, size, filename=path)


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

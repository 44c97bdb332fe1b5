"""The agent's one door to the kernel's system calls: ctypes, errors raised as OSError.

`syscall()` calls one by number and raises OSError(errno, strerror, filename)
when it fails; the thin wrappers below (the new mount API's four calls, openat2)
are built on it, and so are guest_agent.kmod.image's finit_module and init_module;
`closing` closes an fd when a block ends. Mounting with them, and the old
interface's fallback, is guest_agent.kernel.mount. ctypes is imported at the first
system call: a dry run never loads it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import ctypes  # imported when the first system call is made: not for a dry run

# Identical on x86_64, aarch64, riscv64 and every other architecture using the unified table.
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_FSOPEN_CLOEXEC = 0x1
_FSMOUNT_CLOEXEC = 0x1
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02  # openat2's resolve flags
RESOLVE_IN_ROOT = 0x10

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

"""A module file handed to the kernel: as it is, or decompressed here when the kernel cannot.

finit_module(2) takes an uncompressed .ko, and a .ko.zst where the kernel
decompresses (5.17+); .ko.xz and .ko.gz, and .ko.zst for an older kernel, are
decompressed here and passed with init_module(2) (lzma, gzip and zstd imported
only then), with the module's parameters (the kernel command line's, see
guest_agent.kmod.loader). Used by guest_agent.kmod.loader.
"""

from __future__ import annotations

import errno
import os

from guest_agent.kmod.index import ModuleError, module_name

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Protocol

    class ModuleSyscalls(Protocol):
        """The two kernel entry points with a parameter string, raising OSError
        (`LINUX`; tests inject fakes)."""

        def finit_module(self, fd: int, flags: int, params: bytes = b"") -> None: ...

        def init_module(self, image: bytes, params: bytes = b"") -> None: ...


MODULE_INIT_COMPRESSED_FILE = 4  # finit_module flag: the kernel decompresses (5.17+)


# (init_module, finit_module): older than the unified table, so numbered per architecture.
_MODULE_SYSCALLS = {
    "x86_64": (175, 313),
    "aarch64": (105, 273),
    "arm64": (105, 273),
    "riscv64": (105, 273),  # asm-generic numbering
}


def _module_syscall(which: int) -> int:
    numbers = _MODULE_SYSCALLS.get(os.uname().machine)
    if numbers is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    return numbers[which]


class _Linux:
    """The real entry points, through guest_agent.kernel.syscalls' one door, for
    `ModuleSyscalls`."""

    def finit_module(self, fd: int, flags: int, params: bytes = b"") -> None:
        """finit_module(2) with a parameter string ("p=v q=\"a b\"")."""
        from guest_agent.kernel.syscalls import syscall

        syscall(_module_syscall(1), fd, params, flags)

    def init_module(self, image: bytes, params: bytes = b"") -> None:
        from guest_agent.kernel.syscalls import syscall

        syscall(_module_syscall(0), image, len(image), params)


LINUX = _Linux()


def errtext(err: int) -> str:
    """ERRNO as "ENOEXEC: Exec format error", as the agent words a kernel's refusal."""
    return f"{errno.errorcode.get(err, str(err))}: {os.strerror(err)}"


def hand_over(syscalls: ModuleSyscalls, fd: int, path: str, params: bytes = b"") -> None:
    """finit_module, or init_module of the image decompressed here, with PARAMS; OSError
    from the kernel, ModuleError when the file cannot be decompressed."""
    if path.endswith((".ko.xz", ".ko.gz")):
        syscalls.init_module(_decompress(fd, path), params)
    elif not path.endswith(".ko.zst"):
        syscalls.finit_module(fd, 0, params)
    else:
        try:
            syscalls.finit_module(fd, MODULE_INIT_COMPRESSED_FILE, params)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOEXEC):
                raise
            syscalls.init_module(_zstd_decompress(fd, path, e.errno), params)


def _decompress(fd: int, path: str) -> bytes:
    """The module image in the .ko.xz or .ko.gz file FD; ModuleError if it is corrupt."""
    try:
        data = _read_fd(fd)
        if path.endswith(".xz"):
            import lzma

            return lzma.decompress(data)
        import gzip

        return gzip.decompress(data)
    except Exception as e:  # corrupt archive: lzma.LZMAError, OSError, EOFError, ...
        raise ModuleError(module_name(path), f"{path}: cannot decompress: {e}") from None


def _zstd_decompress(fd: int, path: str, kernel_err: int) -> bytes:
    """The module image in the .ko.zst file FD, for a kernel that refused it with KERNEL_ERR;
    ModuleError without zstd in this Python or for a corrupt file."""
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
    except ImportError:
        raise ModuleError(
            module_name(path),
            f"{path}: kernel cannot decompress zstd modules ({errtext(kernel_err)}) "
            "and this Python has no zstd (needs 3.14)",
        ) from None
    try:
        data: bytes = zstd.decompress(_read_fd(fd))
    except Exception as e:  # zstd.ZstdError, OSError, ...
        raise ModuleError(module_name(path), f"{path}: cannot decompress: {e}") from None
    return data


def _read_fd(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)

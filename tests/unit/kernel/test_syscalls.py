"""The one syscall layer: syscall() raising OSError, the thin wrappers, closing, MountError
(and the old mount interface, syscalls_legacy)."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from guest_agent.kernel import mount, syscalls, syscalls_legacy
from guest_agent.kernel.mount import MountError
from guest_agent.kernel.syscalls import closing, syscall

NO_SUCH_SYSCALL = 100_000  # above every architecture's table: ENOSYS everywhere


class FakeLibc:
    """Stands in for libc's typed syscall(2): records the arguments, fails with ERR when set."""

    def __init__(self, err: int = 0, result: int = 0) -> None:
        self.err = err
        self.result = result
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> int:
        self.calls.append(args)
        if self.err:
            ctypes.set_errno(self.err)
            return -1
        return self.result


@pytest.fixture
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(syscalls, "_syscall", fake)
    return fake


def test_syscall_passes_six_arguments_after_the_number(fake_libc: FakeLibc) -> None:
    fake_libc.result = 7
    assert syscall(430, b"ext4", 1, None) == 7
    assert fake_libc.calls == [(430, b"ext4", 1, None, 0, 0, 0)]  # unused ones are 0


def test_the_prototype_passes_ints_as_64_bit_values() -> None:
    fn = syscalls._raw_syscall()
    assert fn.restype is ctypes.c_long
    assert fn.argtypes == (ctypes.c_long, *(ctypes.c_void_p,) * 6)
    # a negative int (AT_FDCWD) reaches the kernel whole: openat2 opens "/" relative to it
    fd = syscalls.openat2(-100, "/", os.O_PATH | os.O_CLOEXEC, 0)
    try:
        assert os.path.samestat(os.fstat(fd), os.stat("/"))
    finally:
        os.close(fd)


def test_syscall_failure_raises_oserror_with_errno_strerror_and_filename(
    fake_libc: FakeLibc,
) -> None:
    fake_libc.err = errno.ENOENT
    with pytest.raises(OSError) as raised:
        syscall(437, -100, b"/x", filename="/x")
    assert type(raised.value) is FileNotFoundError  # OSError picks the subclass by errno
    assert raised.value.errno == errno.ENOENT
    assert raised.value.strerror == os.strerror(errno.ENOENT)
    assert raised.value.filename == "/x"
    fake_libc.err = errno.EPERM
    with pytest.raises(PermissionError) as denied:
        syscall(430, b"ext4", 1)
    assert denied.value.filename is None
    assert str(denied.value) == f"[Errno {errno.EPERM}] {os.strerror(errno.EPERM)}"


def test_syscall_reaches_the_kernel() -> None:
    with pytest.raises(OSError) as raised:
        syscall(NO_SUCH_SYSCALL, 1, 2, 3)
    assert raised.value.errno == errno.ENOSYS
    assert raised.value.strerror == os.strerror(errno.ENOSYS)


def test_wrapper_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(OSError) as raised:  # -1: neither an fd nor AT_FDCWD
        syscalls.openat2(-1, "relative", os.O_PATH, 0)
    assert raised.value.errno in (errno.EBADF, errno.ENOSYS)
    assert raised.value.filename == "relative"
    with pytest.raises(OSError) as not_mounted:
        syscalls_legacy.umount2(str(tmp_path))
    assert not_mounted.value.errno in (errno.EINVAL, errno.EPERM)
    assert not_mounted.value.filename == str(tmp_path)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return False
    return True


def test_closing_closes_when_the_block_ends(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_PATH)
    with closing(fd) as same:
        assert same == fd and _is_open(fd)
    assert not _is_open(fd)


def test_closing_closes_when_the_block_raises(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_PATH)
    with pytest.raises(ValueError, match="boom"), closing(fd):
        raise ValueError("boom")
    assert not _is_open(fd)


def test_closing_lets_an_exception_through_unchanged(tmp_path: Path) -> None:
    error = OSError(errno.EIO, "inner")
    with pytest.raises(OSError) as raised, closing(os.open(tmp_path, os.O_PATH)):
        raise error
    assert raised.value is error


def test_mount_error_carries_the_kernels_words() -> None:
    e = MountError(errno.EINVAL, "option 'bogus'", "overlay: unrecognized mount option")
    assert (e.errno, e.step) == (errno.EINVAL, "option 'bogus'")
    assert e.kernel_says == "overlay: unrecognized mount option"
    assert str(e) == f"{os.strerror(errno.EINVAL)}: overlay: unrecognized mount option"
    assert str(MountError(errno.EBUSY, "umount")) == os.strerror(errno.EBUSY)


def test_umount_of_a_non_mount_point_is_a_mount_error(tmp_path: Path) -> None:
    with pytest.raises(MountError) as raised:
        mount.umount(str(tmp_path))
    assert raised.value.errno in (errno.EINVAL, errno.EPERM)
    assert raised.value.step == "umount"

"""Tests for guest_agent.devices.blank without root: where it looks (sample offsets, ranges), the zero
checks on regular files, the refusal of everything that is not a block device, and the whole
check on regular files made to pass for block devices (the host tests use real ones)."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_agent.devices import blank
from guest_agent.devices.blank import (
    HEAD,
    SAMPLE,
    SAMPLES,
    TAIL,
    first_data,
    ranges,
    sample_offsets,
    why_not_blank,
)

MiB = 1 << 20
GiB = 1 << 30
READ = HEAD + TAIL + SAMPLES * SAMPLE  # bytes read from a big device
WHOLE = READ + SAMPLES * 4096  # a device up to this size is read whole


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def poke(path: Path, offset: int, data: bytes = b"\x01") -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def in_ranges(offset: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= offset < end for start, end in spans)


@pytest.fixture
def as_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let regular files pass the block-device check, to run the rest of the check on them."""
    monkeypatch.setattr(blank, "_not_block", lambda fd: None)


@pytest.fixture
def fd_of(tmp_path: Path) -> Iterator[dict[str, int]]:
    opened: dict[str, int] = {}
    yield opened
    for fd in opened.values():
        os.close(fd)


def open_ro(path: Path, opened: dict[str, int]) -> int:
    fd = os.open(path, os.O_RDONLY)
    opened[str(path)] = fd
    return fd


# ------------------------------------------------------------------ where it looks


@pytest.mark.parametrize("size", [WHOLE + 1, WHOLE + 12345, 100 * MiB, 10 * GiB + 12345, 4 << 40])
def test_samples_are_many_evenly_spaced_aligned_and_between_head_and_tail(size: int) -> None:
    offsets = sample_offsets(size)
    assert len(offsets) == SAMPLES >= 64
    assert all(off % 4096 == 0 for off in offsets)
    assert offsets[0] >= HEAD and offsets[-1] + SAMPLE <= size - TAIL
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert min(gaps) >= SAMPLE  # no two overlap
    assert max(gaps) - min(gaps) <= 4096  # evenly spaced, up to the alignment
    slice_ = (size - HEAD - TAIL) / SAMPLES  # one in each slice, the first and last included
    assert offsets[0] < HEAD + slice_ and offsets[-1] >= size - TAIL - slice_ - 4096


def test_devices_read_whole_have_no_samples() -> None:
    assert sample_offsets(4096) == []
    assert sample_offsets(WHOLE) == []


@pytest.mark.parametrize("size", [1, 4096, MiB, 20 * MiB, WHOLE])
def test_small_devices_are_read_whole(size: int) -> None:
    assert ranges(size) == [(0, size)]


def test_empty_device_has_nothing_to_read() -> None:
    assert ranges(0) == []


@pytest.mark.parametrize("size", [WHOLE + 1, WHOLE + 4096, 64 * MiB, 256 * MiB + 512, 1 << 40])
def test_ranges_cover_head_tail_and_samples(size: int) -> None:
    spans = ranges(size)
    assert spans == sorted(spans)
    assert all(a < b for a, b in spans)
    assert all(prev[1] < nxt[0] for prev, nxt in itertools.pairwise(spans))  # merged
    assert spans[0][0] == 0 and spans[0][1] >= HEAD
    assert spans[-1][1] == size and spans[-1][0] <= size - TAIL
    for off in sample_offsets(size):
        assert in_ranges(off, spans) and in_ranges(off + SAMPLE - 1, spans)
    assert sum(b - a for a, b in spans) == READ  # what docs/faults.md promises


def test_a_terabyte_costs_21_mib() -> None:
    assert sum(b - a for a, b in ranges(1 << 40)) == READ == 21 * MiB


# ------------------------------------------------------------------ the zero checks


def test_first_data_on_zeros_is_none(tmp_path: Path, fd_of: dict[str, int]) -> None:
    disk = sparse(tmp_path / "disk", 64 * MiB)
    assert first_data(open_ro(disk, fd_of), ranges(64 * MiB)) is None


@pytest.mark.parametrize("offset", [0, 1, MiB, MiB + 4095, HEAD - 1, 64 * MiB - TAIL, 64 * MiB - 1])
def test_first_data_finds_one_byte_exactly(
    tmp_path: Path, fd_of: dict[str, int], offset: int
) -> None:
    disk = sparse(tmp_path / "disk", 64 * MiB)
    poke(disk, offset)
    assert first_data(open_ro(disk, fd_of), ranges(64 * MiB)) == offset


def test_first_data_finds_a_byte_in_any_sample(tmp_path: Path, fd_of: dict[str, int]) -> None:
    size = 256 * MiB
    disk = sparse(tmp_path / "disk", size)
    fd = open_ro(disk, fd_of)
    for off in sample_offsets(size):
        target = off + SAMPLE // 2
        poke(disk, target)
        assert first_data(fd, ranges(size)) == target
        poke(disk, target, b"\0")
    assert first_data(fd, ranges(size)) is None


def test_first_data_does_not_look_between_samples(tmp_path: Path, fd_of: dict[str, int]) -> None:
    # The cost of sampling, stated: a byte between two samples is not seen.
    size = 256 * MiB
    disk = sparse(tmp_path / "disk", size)
    gap = sample_offsets(size)[10] + SAMPLE
    assert not in_ranges(gap, ranges(size))
    poke(disk, gap)
    assert first_data(open_ro(disk, fd_of), ranges(size)) is None


def test_first_data_stops_at_end_of_file(tmp_path: Path, fd_of: dict[str, int]) -> None:
    disk = sparse(tmp_path / "disk", MiB)
    assert first_data(open_ro(disk, fd_of), [(0, 2 * MiB), (3 * MiB, 4 * MiB)]) is None


def test_first_data_on_a_pipe() -> None:
    # Anything that preads: a fake device fed from a pipe refuses pread (ESPIPE), loudly.
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as e:
            first_data(r, [(0, 10)])
        assert e.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)


# ------------------------------------------------------------------ not a block device


def check_soon(path: str) -> str | None:
    """why_not_blank(path) in a thread: the test fails instead of hanging if it blocks."""
    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(why_not_blank(path)), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"why_not_blank({path!r}) blocked"
    return result[0]


def test_regular_file_is_refused(tmp_path: Path) -> None:
    assert check_soon(str(sparse(tmp_path / "disk", 8 * MiB))) == (
        "is not a block device (a regular file)"
    )


def test_char_device_is_refused() -> None:
    assert check_soon("/dev/null") == "is not a block device (a character device)"
    assert check_soon("/dev/zero") == "is not a block device (a character device)"


def test_symlink_to_char_device_is_refused(tmp_path: Path) -> None:
    (tmp_path / "disk").symlink_to("/dev/null")
    assert check_soon(str(tmp_path / "disk")) == "is not a block device (a character device)"


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open would hang here
    assert check_soon(str(fifo)) == "is not a block device (a FIFO)"


def test_directory_is_refused(tmp_path: Path) -> None:
    assert check_soon(str(tmp_path)) == "is not a block device (a directory)"


def test_missing_device_is_a_reason(tmp_path: Path) -> None:
    assert check_soon(str(tmp_path / "nope")) == "cannot be opened: No such file or directory"


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES, errno.EIO])
def test_unopenable_device_names_the_errno(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, err: int
) -> None:
    def refuse(path: str, flags: int, mode: int = 0o777) -> int:
        raise OSError(err, os.strerror(err), path)

    monkeypatch.setattr(os, "open", refuse)
    assert why_not_blank(str(tmp_path / "x")) == f"cannot be opened: {os.strerror(err)}"


def test_open_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[int] = []
    real_open = os.open

    def spy(path: str, flags: int, mode: int = 0o777) -> int:
        seen.append(flags)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", spy)
    why_not_blank(str(sparse(tmp_path / "disk", 4096)))
    want = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    assert seen == [want]


# ------------------------------------------------------------------ the whole check on files


def test_blank_file_passing_for_a_device_is_blank(as_block: None, tmp_path: Path) -> None:
    assert why_not_blank(str(sparse(tmp_path / "disk", 64 * MiB))) is None


def test_empty_device_is_not_blank(as_block: None, tmp_path: Path) -> None:
    assert why_not_blank(str(sparse(tmp_path / "disk", 0))) == "is empty (0 bytes)"


@pytest.mark.parametrize("offset", [MiB, 10 * MiB, 64 * MiB - 1])
def test_data_is_reported_with_its_offset(as_block: None, tmp_path: Path, offset: int) -> None:
    disk = sparse(tmp_path / "disk", 64 * MiB)
    poke(disk, offset, b"ustar")
    assert why_not_blank(str(disk)) == f"has data at offset {offset}"


def test_read_error_is_a_reason(
    as_block: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    disk = sparse(tmp_path / "disk", 64 * MiB)
    monkeypatch.setattr(blank, "_signature", lambda fd: None)

    def eio(fd: int, n: int, offset: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pread", eio)
    assert why_not_blank(str(disk)) == "cannot be read: Input/output error"


def ext4_image(tmp_path: Path) -> Path:
    img = sparse(tmp_path / "ext4.img", 32 * MiB)
    done = subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"mkfs.ext4 failed (install e2fsprogs): {done.stderr!r}", pytrace=False)
    return img


def test_libblkid_names_the_signature(as_block: None, tmp_path: Path) -> None:
    if blank._load_libblkid() is None:
        pytest.fail("libblkid.so.1 cannot be loaded (install libblkid1)", pytrace=False)
    assert why_not_blank(str(ext4_image(tmp_path))) == "holds ext4 (libblkid)"


def test_without_libblkid_the_own_prober_stands_in(
    as_block: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(blank, "_load_libblkid", lambda: None)
    assert why_not_blank(str(ext4_image(tmp_path))) == "holds ext4 (guest-agent's prober)"
    disk = sparse(tmp_path / "disk", 64 * MiB)
    assert why_not_blank(str(disk)) is None
    target = sample_offsets(64 * MiB)[30]
    poke(disk, target + 5)
    assert why_not_blank(str(disk)) == f"has data at offset {target + 5}"


def test_libblkid_is_loaded_by_soname_without_find_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctypes
    import ctypes.util

    def forbidden(name: str) -> str | None:
        raise AssertionError("find_library spawns processes")

    names: list[str] = []
    real_cdll = ctypes.CDLL

    def cdll(name: str, *args: object, **kwargs: object) -> ctypes.CDLL:
        names.append(name)
        return real_cdll(name)

    monkeypatch.setattr(ctypes.util, "find_library", forbidden)
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(blank, "_libblkid", None)
    monkeypatch.setattr(blank, "_libblkid_failed", False)
    assert blank._load_libblkid() is not None
    assert names == ["libblkid.so.1"]


def test_missing_libblkid_is_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    calls: list[str] = []

    def absent(name: str, *args: object, **kwargs: object) -> ctypes.CDLL:
        calls.append(name)
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", absent)
    monkeypatch.setattr(blank, "_libblkid", None)
    monkeypatch.setattr(blank, "_libblkid_failed", False)
    assert blank._load_libblkid() is None
    assert blank._load_libblkid() is None
    assert calls == ["libblkid.so.1"]


def test_importing_blank_imports_no_ctypes() -> None:
    code = (
        "import sys; import guest_agent.devices.blank; "
        "bad = {'ctypes', 'struct', 'fcntl', 'typing'} & set(sys.modules); "
        "print(sorted(bad))"
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


@given(st.integers(min_value=WHOLE + 1, max_value=1 << 50))
def test_any_size_reads_exactly_21_mib_in_disjoint_ranges(size: int) -> None:
    spans = ranges(size)
    assert sum(b - a for a, b in spans) == READ
    assert all(prev[1] < nxt[0] for prev, nxt in itertools.pairwise(spans))  # merged
    assert spans[0][0] == 0 and spans[0][1] >= HEAD
    assert spans[-1][1] == size and spans[-1][0] <= size - TAIL


@given(st.integers(min_value=0, max_value=WHOLE))
def test_any_small_size_is_read_whole(size: int) -> None:
    assert ranges(size) == ([(0, size)] if size else [])

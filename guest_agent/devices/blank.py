"""Is this disk blank?  The question ``x-makefs`` asks before it formats anything.

``x-makefs`` formats a volume only when it is blank, and "blank" is meant strictly: a
block device that is all zeros wherever the agent looks, and it looks well:

1. it must be a block device (checked with ``fstat`` on the opened fd, so nothing can be
   swapped in between): a character device, a regular file, a FIFO are refused;
2. no signature ``blkid -p`` knows, superblock or partition table (libblkid, loaded
   through ctypes by its soname; when it cannot be loaded, the agent's own prober in
   ``probe.py`` stands in for it, and the zero checks below keep the answer safe);
3. zeros in the first ``HEAD`` bytes (16 MiB: partitions at 1 MiB, MBR/GPT, every
   superblock ``probe.py`` knows), in the last ``TAIL`` bytes (1 MiB: the backup GPT, md
   0.90/1.0 superblocks) and in ``SAMPLES`` samples of ``SAMPLE`` bytes spread evenly over
   everything in between (stale data in the middle): 21 MiB read, whatever the size.  A
   device no bigger than that is read whole.

Anything else, including a device that cannot be opened or read, is "not blank", with
the reason as one short clause that reads after the device's name.  This runs only for
``x-makefs`` volumes that carry no signature, so it imports ``ctypes`` only when called.
"""

from __future__ import annotations

import os

from guest_agent.kernel.syscalls import closing

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import ctypes

__all__ = ["HEAD", "SAMPLE", "SAMPLES", "TAIL", "why_not_blank"]

HEAD = 16 << 20  # the first 16 MiB must be zeros
TAIL = 1 << 20  # and the last MiB
SAMPLES = 64  # and this many samples spread evenly over the device
SAMPLE = 64 << 10  # of 64 KiB each
_ALIGN = 4096  # samples start on 4 KiB boundaries
# A device up to this size is read whole (21.25 MiB); beyond it, the aligned samples never
# overlap, so exactly HEAD + TAIL + SAMPLES * SAMPLE (21 MiB) are read whatever the size.
_WHOLE = HEAD + TAIL + SAMPLES * (SAMPLE + _ALIGN)
_CHUNK = 1 << 20  # read size for the zero checks

# libblkid's flags (blkid.h)
_SUBLKS_LABEL = 1 << 1
_SUBLKS_UUID = 1 << 3
_SUBLKS_TYPE = 1 << 5
_SUBLKS_SECTYPE = 1 << 6
_SUBLKS_USAGE = 1 << 7
_SUBLKS_VERSION = 1 << 8
_SUBLKS_BADCSUM = 1 << 10  # report a superblock with a bad checksum too (blkid -p does not)
_SUBLKS_FLAGS = (
    _SUBLKS_LABEL | _SUBLKS_UUID | _SUBLKS_TYPE | _SUBLKS_SECTYPE | _SUBLKS_USAGE
    | _SUBLKS_VERSION | _SUBLKS_BADCSUM
)  # fmt: skip

_KINDS = {  # st_mode & S_IFMT -> what to call it
    0o020000: "a character device",
    0o040000: "a directory",
    0o010000: "a FIFO",
    0o100000: "a regular file",
    0o140000: "a socket",
}
_S_IFBLK = 0o060000

_libblkid: ctypes.CDLL | None = None
_libblkid_failed = False


def why_not_blank(path: str) -> str | None:
    """None when PATH is a block device that is blank everywhere we look; else the reason.

    The reason is one short clause to follow the device's name, e.g. "is not a block device
    (a character device)", "holds crypto_LUKS (libblkid)", "has data at offset 1048576".
    Never raises OSError: an unopenable or unreadable device is a reason too.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as e:
        return f"cannot be opened: {_strerror(e)}"
    with closing(fd):
        try:
            wrong_kind = _not_block(fd)
            if wrong_kind is not None:
                return wrong_kind
            size = os.lseek(fd, 0, os.SEEK_END)
            if size <= 0:
                return "is empty (0 bytes)"
            found = _signature(fd)
            if found is not None:
                return found
            return _data_reason(fd, size)
        except OSError as e:
            return f"cannot be read: {_strerror(e)}"


def _not_block(fd: int) -> str | None:
    """The reason when the open fd is not a block device (fstat: the very file we read)."""
    mode = os.fstat(fd).st_mode & 0o170000
    if mode == _S_IFBLK:
        return None
    return f"is not a block device ({_KINDS.get(mode, 'of another kind')})"


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _data_reason(fd: int, size: int) -> str | None:
    where = first_data(fd, ranges(size))
    return None if where is None else f"has data at offset {where}"


# ---------------------------------------------------------------- where to look


def sample_offsets(size: int) -> list[int]:
    """Where the SAMPLES samples start: the middle of each of SAMPLES equal slices of the part
    between the head and the tail, aligned down to 4 KiB.  None for a device read whole."""
    if size <= _WHOLE:
        return []
    slice_ = (size - TAIL - HEAD) / SAMPLES
    return [int(HEAD + (i + 0.5) * slice_ - SAMPLE / 2) // _ALIGN * _ALIGN for i in range(SAMPLES)]


def ranges(size: int) -> list[tuple[int, int]]:
    """The [start, end) byte ranges that must be zeros: sorted, merged, within the device.

    A device no bigger than 21.25 MiB is read whole.
    """
    if size <= _WHOLE:
        return [(0, size)] if size > 0 else []
    wanted = [(0, min(size, HEAD)), (max(0, size - TAIL), size)]
    wanted += [(off, min(size, off + SAMPLE)) for off in sample_offsets(size)]
    merged: list[tuple[int, int]] = []
    for start, end in sorted(wanted):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def first_data(fd: int, spans: list[tuple[int, int]]) -> int | None:
    """Offset of the first non-zero byte in the spans, or None when they are all zeros.

    A span that ends early (the device is shorter than thought) is checked as far as it goes.
    """
    zeros = bytes(_CHUNK)
    for start, end in spans:
        offset = start
        while offset < end:
            chunk = os.pread(fd, min(_CHUNK, end - offset), offset)
            if not chunk:
                break
            if chunk != (zeros if len(chunk) == _CHUNK else zeros[: len(chunk)]):
                return offset + len(chunk) - len(chunk.lstrip(b"\0"))
            offset += len(chunk)
    return None


# ---------------------------------------------------------------- signatures


def _signature(fd: int) -> str | None:
    """The signature on the device, as a reason; libblkid if it loads, else probe.py."""
    lib = _load_libblkid()
    if lib is not None:
        return _blkid_reason(lib, fd)
    from guest_agent.devices.probe import PROBE_SIZE, probe_bytes

    sig = probe_bytes(os.pread(fd, PROBE_SIZE, 0))
    return None if sig is None else f"holds {sig.fstype} (guest-agent's prober)"


def _load_libblkid() -> ctypes.CDLL | None:
    """libblkid.so.1 by soname (no find_library: it spawns processes), once; None if absent."""
    global _libblkid, _libblkid_failed
    if _libblkid is not None or _libblkid_failed:
        return _libblkid
    import ctypes

    try:
        lib = ctypes.CDLL("libblkid.so.1")
        p, i, i64, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_char_p
        signatures = {
            "blkid_new_probe": ([], p),
            "blkid_free_probe": ([p], None),
            "blkid_probe_set_device": ([p, i, i64, i64], i),
            "blkid_probe_enable_superblocks": ([p, i], i),
            "blkid_probe_set_superblocks_flags": ([p, i], i),
            "blkid_probe_enable_partitions": ([p, i], i),
            "blkid_do_safeprobe": ([p], i),
            "blkid_probe_lookup_value": (
                [p, s, ctypes.POINTER(s), ctypes.POINTER(ctypes.c_size_t)],
                i,
            ),
        }
        for name, (argtypes, restype) in signatures.items():
            func = getattr(lib, name)
            func.argtypes = argtypes
            func.restype = restype
    except (OSError, AttributeError):
        _libblkid_failed = True
        return None
    _libblkid = lib
    return lib


def _blkid_reason(lib: ctypes.CDLL, fd: int) -> str | None:
    """Probe like ``blkid -p``: superblocks and partition tables, ambiguity included."""
    import ctypes

    probe = lib.blkid_new_probe()
    if not probe:
        return "cannot be probed (libblkid: out of memory)"
    try:
        if lib.blkid_probe_set_device(probe, fd, 0, 0) != 0:
            return "cannot be probed (libblkid refused the device)"
        lib.blkid_probe_enable_superblocks(probe, 1)
        lib.blkid_probe_set_superblocks_flags(probe, _SUBLKS_FLAGS)
        lib.blkid_probe_enable_partitions(probe, 1)
        rc = lib.blkid_do_safeprobe(probe)
        if rc == 1:
            return None  # nothing found
        if rc == -2:
            return "holds more than one signature (libblkid: ambiguous)"
        if rc != 0:
            return "cannot be probed (libblkid failed to read it)"
        value = ctypes.c_char_p()
        length = ctypes.c_size_t()
        for key, text in (("TYPE", "{}"), ("PTTYPE", "a {} partition table")):
            if lib.blkid_probe_lookup_value(probe, key.encode(), ctypes.byref(value),
                                            ctypes.byref(length)) == 0 and value.value:  # fmt: skip
                name = value.value.decode("utf-8", "replace")
                return "holds " + text.format(name) + " (libblkid)"
        return "holds a signature (libblkid)"
    finally:
        lib.blkid_free_probe(probe)

"""Pure, blkid-like block device signature prober.

The guest initrd has neither udev nor blkid, so the agent identifies filesystems,
containers and partition tables itself from the first ``PROBE_SIZE`` bytes of a
device.  Offsets below are byte offsets from the start of the device unless
stated otherwise; the struct names are those of the kernel / util-linux headers.

Probe order (first match wins) and why:

1. ``linux_raid_member`` (md v1.1 at 0, v1.2 at 4096): a RAID member may carry
   a copy of a filesystem signature that belongs to the array, not the disk.
2. ``crypto_LUKS``, ``LVM2_member``: containers; their payload is opaque.
3. ``iso9660``: before vfat and the partition tables, because hybrid ISOs
   (isohybrid) also carry an MBR and often a GPT; blkid reports them as iso9660.
4. Filesystems with a unique magic: xfs, btrfs, erofs, squashfs, f2fs, ext*.
5. ``ntfs`` and ``vfat``: before ``dos``, because their boot sectors end in
   0x55AA exactly like an MBR.
6. ``swap``.
7. ``gpt`` (header CRC checked) before ``dos``, because a GPT disk has a
   protective MBR; ``dos`` last and only for a plausible partition entry.

Known limits (all need reads beyond the head, or are rare): md 0.90/1.0
superblocks (at the end of the device), the NTFS label (in the $Volume MFT
record), the FAT label in the root directory entry (the boot sector copy is
used), the iso9660 Joliet label (the primary volume descriptor is used).
"""

from __future__ import annotations

import os
import struct

from guest_agent.devices.probe_containers import _dos, _gpt, _luks, _lvm2, _md
from guest_agent.devices.probe_filesystems import (
    PROBE_SIZE,
    Signature,
    _btrfs,
    _erofs,
    _ext,
    _f2fs,
    _iso9660,
    _ntfs,
    _squashfs,
    _swap,
    _vfat,
    _xfs,
)
from guest_agent.kernel.syscalls import closing

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["PROBE_SIZE", "Signature", "probe_bytes", "probe_device"]


_PROBES: tuple[Callable[[bytes], Signature | None], ...] = (
    _md,
    _luks,
    _lvm2,
    _iso9660,
    _xfs,
    _btrfs,
    _erofs,
    _squashfs,
    _f2fs,
    _ext,
    _ntfs,
    _vfat,
    _swap,
    _gpt,
    _dos,
)


def probe_bytes(head: bytes) -> Signature | None:
    """Identify the signature in the first bytes of a device (ideally PROBE_SIZE of them).

    Pure and total: a short, empty or garbage buffer gives None, never an exception.
    """
    head = bytes(head[:PROBE_SIZE])
    for probe in _PROBES:
        try:
            sig = probe(head)
        except (ValueError, IndexError, struct.error, UnicodeError):  # pragma: no cover
            sig = None  # defensive: every probe bounds-checks before reading
        if sig is not None:
            return sig
    return None


def _pread_full(fd: int, size: int, offset: int) -> bytes:
    """pread until size bytes or end of device."""
    parts: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def probe_device(path: str) -> Signature | None:
    """Read the head of path and probe it.  Raises OSError on I/O problems."""
    with closing(os.open(path, os.O_RDONLY | os.O_CLOEXEC)) as fd:
        return probe_bytes(_pread_full(fd, PROBE_SIZE, 0))


def describe_disks(sysfs: str = "/sys") -> list[str]:
    """The virtio disks there now and what they hold (their superblocks), for a
    timeout message."""
    from guest_agent.devices.sysfs import scan_block_devices

    seen = []
    for dev in scan_block_devices(sysfs):
        if not dev.virtio:
            continue
        try:
            sig = probe_device(dev.devnode) if dev.size_bytes else None
        except OSError as e:
            seen.append(f"{dev.name} (cannot be read: {e.strerror})")
            continue
        parts = [dev.name]
        if dev.serial:
            parts.append(f"serial {dev.serial}")
        if sig is not None:
            parts.append(sig.fstype + (f" label {sig.label}" if sig.label else ""))
        elif dev.size_bytes:
            parts.append("with no filesystem signature")
        seen.append(" ".join(parts))
    return seen

"""The fields of on-disk signatures: the `Signature` record, and readers of raw bytes.

Shared by the signature readers (`probe_filesystems`, `probe_containers`); the
prober itself, and the order it tries them in, is `probe.py`.
"""

from __future__ import annotations

from guest_agent.records import NamedTuple

BTRFS_SB = 0x10000  # btrfs_super_block: primary copy at 64 KiB, 4 KiB long
PROBE_SIZE: int = BTRFS_SB + 4096  # 68 KiB: also covers iso9660's PVD at 32 KiB

FILESYSTEM = "filesystem"
OTHER = "other"
PARTITION_TABLE = "partition-table"


class Signature(NamedTuple):
    fstype: str  # name for mount(2) ("ext4" for ext2/3/4), or blkid's TYPE / PTTYPE
    label: str | None
    uuid: str | None  # blkid's UUID (PTUUID for partition tables)
    usage: str  # "filesystem" | "other" | "partition-table"
    version: str | None = None  # e.g. "ext2"/"ext3"/"ext4", "FAT32", "1.2"


def u16le(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "little")


def u32le(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "little")


def u64le(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 8], "little")


def u32be(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "big")


def u16be(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "big")


def read_label(raw: bytes) -> str | None:
    """NUL-terminated and/or space-padded on-disk string -> str, or None if empty."""
    text = raw.split(b"\0", 1)[0].rstrip(b" ").decode("utf-8", errors="replace")
    return text or None


def uuid_text(raw: bytes) -> str:
    """16 bytes as 8-4-4-4-12 lowercase hex (what uuid.UUID prints, without importing uuid)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def read_uuid(raw: bytes) -> str | None:
    """16 raw bytes -> lowercase 8-4-4-4-12; None when all zero (as blkid)."""
    if len(raw) != 16 or not any(raw):
        return None
    return uuid_text(raw)


def pow2(n: int, lo: int, hi: int) -> bool:
    return lo <= n <= hi and n & (n - 1) == 0

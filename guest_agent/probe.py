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
import zlib

from guest_agent.records import NamedTuple
from guest_agent.syscalls import closing

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["PROBE_SIZE", "Signature", "probe_bytes", "probe_device"]

_BTRFS_SB = 0x10000  # btrfs_super_block: primary copy at 64 KiB, 4 KiB long
PROBE_SIZE: int = _BTRFS_SB + 4096  # 68 KiB: also covers iso9660's PVD at 32 KiB

FILESYSTEM = "filesystem"
OTHER = "other"
PARTITION_TABLE = "partition-table"


class Signature(NamedTuple):
    fstype: str  # name for mount(2) ("ext4" for ext2/3/4), or blkid's TYPE / PTTYPE
    label: str | None
    uuid: str | None  # blkid's UUID (PTUUID for partition tables)
    usage: str  # "filesystem" | "other" | "partition-table"
    version: str | None = None  # e.g. "ext2"/"ext3"/"ext4", "FAT32", "1.2"


# ---------------------------------------------------------------- helpers


def _u16le(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "little")


def _u32le(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "little")


def _u64le(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 8], "little")


def _u32be(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "big")


def _u16be(b: bytes, off: int) -> int:
    return int.from_bytes(b[off : off + 2], "big")


def _label(raw: bytes) -> str | None:
    """NUL-terminated and/or space-padded on-disk string -> str, or None if empty."""
    text = raw.split(b"\0", 1)[0].rstrip(b" ").decode("utf-8", errors="replace")
    return text or None


def _uuid_text(raw: bytes) -> str:
    """16 bytes as 8-4-4-4-12 lowercase hex (what uuid.UUID prints, without importing uuid)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _uuid(raw: bytes) -> str | None:
    """16 raw bytes -> lowercase 8-4-4-4-12; None when all zero (as blkid)."""
    if len(raw) != 16 or not any(raw):
        return None
    return _uuid_text(raw)


def _pow2(n: int, lo: int, hi: int) -> bool:
    return lo <= n <= hi and n & (n - 1) == 0


# ---------------------------------------------------------------- containers


def _md(h: bytes) -> Signature | None:
    # mdp_superblock_1: magic le32 @0 (0xa92b4efc), major_version @4, set_uuid[16] @16,
    # set_name[32] @32, super_offset le64 @128 (sectors).  v1.1 sits at 0, v1.2 at 4 KiB.
    for off, version in ((0, "1.1"), (4096, "1.2")):
        sb = h[off : off + 256]
        if len(sb) < 256 or _u32le(sb, 0) != 0xA92B4EFC:
            continue
        if _u32le(sb, 4) != 1 or _u64le(sb, 128) * 512 != off:
            continue
        return Signature("linux_raid_member", _label(sb[32:64]), _uuid(sb[16:32]), OTHER, version)
    return None


def _luks(h: bytes) -> Signature | None:
    # luks_phdr / luks2_hdr_disk: magic "LUKS\xba\xbe" @0, version be16 @6,
    # LUKS2 label[48] @24, uuid[40] (ASCII) @168.
    if len(h) < 208 or h[:6] != b"LUKS\xba\xbe":
        return None
    version = _u16be(h, 6)
    if version not in (1, 2):
        return None
    label = _label(h[24:72]) if version == 2 else None
    return Signature("crypto_LUKS", label, _label(h[168:208]), OTHER, str(version))


def _lvm2(h: bytes) -> Signature | None:
    # label_header in one of sectors 0..3: id "LABELONE" @0, sector_xl le64 @8,
    # offset_xl le32 @20, type "LVM2 001" @24; pv_header.pv_uuid[32] @offset_xl.
    for sector in range(4):
        lh = h[sector * 512 : sector * 512 + 512]
        if len(lh) < 512 or lh[:8] != b"LABELONE" or lh[24:32] != b"LVM2 001":
            continue
        if _u64le(lh, 8) != sector:
            continue
        off = _u32le(lh, 20)
        raw = lh[off : off + 32]
        pv = None
        if off >= 32 and len(raw) == 32:
            s = raw.decode("ascii", errors="replace")  # blkid prints it 6-4-4-4-4-4-6
            pv = "-".join((s[0:6], s[6:10], s[10:14], s[14:18], s[18:22], s[22:26], s[26:32]))
        return Signature("LVM2_member", None, pv, OTHER, "LVM2 001")
    return None


# ---------------------------------------------------------------- filesystems


def _iso9660(h: bytes) -> Signature | None:
    # Primary volume descriptor at 32 KiB (ECMA-119 8.4): type 1 @0, "CD001" @1,
    # volume identifier[32] @40, creation date @813, modification date @830 (17 bytes:
    # 16 ASCII digits + tz).  blkid derives UUID from the modification (else creation) date.
    pvd = h[0x8000 : 0x8000 + 2048]
    if len(pvd) < 2048 or pvd[1:6] != b"CD001" or pvd[0] != 1:
        return None
    return Signature(
        "iso9660",
        _label(pvd[40:72]),
        _iso_date(pvd[830:847]) or _iso_date(pvd[813:830]),
        FILESYSTEM,
    )


def _iso_date(d: bytes) -> str | None:
    digits = d[:16]
    if digits == b"0" * 16 and d[16] == 0:
        return None
    if not digits.isdigit():
        return None
    s = digits.decode("ascii")
    return f"{s[0:4]}-{s[4:6]}-{s[6:8]}-{s[8:10]}-{s[10:12]}-{s[12:14]}-{s[14:16]}"


def _xfs(h: bytes) -> Signature | None:
    # xfs_dsb (big-endian): magic "XFSB" @0, sb_blocksize @4, sb_uuid @32,
    # sb_sectsize be16 @102, sb_fname[12] @108.
    if len(h) < 120 or h[:4] != b"XFSB":
        return None
    if not _pow2(_u32be(h, 4), 512, 65536) or not _pow2(_u16be(h, 102), 512, 32768):
        return None
    return Signature("xfs", _label(h[108:120]), _uuid(h[32:48]), FILESYSTEM)


def _btrfs(h: bytes) -> Signature | None:
    # btrfs_super_block at 64 KiB: fsid[16] @32, bytenr le64 @48 (its own offset),
    # magic "_BHRfS_M" @64, label[256] @299.
    sb = h[_BTRFS_SB : _BTRFS_SB + 555]
    if len(sb) < 555 or sb[64:72] != b"_BHRfS_M" or _u64le(sb, 48) != _BTRFS_SB:
        return None
    return Signature("btrfs", _label(sb[299:555]), _uuid(sb[32:48]), FILESYSTEM)


def _erofs(h: bytes) -> Signature | None:
    # erofs_super_block at 1024: magic le32 0xE0F5E1E2 @0, blkszbits u8 @12,
    # uuid[16] @48, volume_name[16] @64.
    sb = h[1024 : 1024 + 80]
    if len(sb) < 80 or _u32le(sb, 0) != 0xE0F5E1E2 or not 9 <= sb[12] <= 16:
        return None
    return Signature("erofs", _label(sb[64:80]), _uuid(sb[48:64]), FILESYSTEM)


def _squashfs(h: bytes) -> Signature | None:
    # squashfs_super_block: s_magic "hsqs" @0 (little-endian), s_major le16 @28,
    # s_minor le16 @30.  No label or UUID.  Pre-4.0 images are "squashfs3" (as blkid).
    if len(h) < 32 or h[:4] != b"hsqs":
        return None
    major, minor = _u16le(h, 28), _u16le(h, 30)
    if not 1 <= major <= 4:
        return None
    return Signature(
        "squashfs" if major == 4 else "squashfs3", None, None, FILESYSTEM, f"{major}.{minor}"
    )


def _f2fs(h: bytes) -> Signature | None:
    # f2fs_super_block at 1024: magic le32 0xF2F52010 @0, log_blocksize @16,
    # uuid[16] @108, volume_name: 512 UTF-16LE units @124.
    sb = h[1024 : 1024 + 124 + 1024]
    if len(sb) < 1148 or _u32le(sb, 0) != 0xF2F52010 or not 9 <= _u32le(sb, 16) <= 16:
        return None
    name = sb[124:1148]
    for i in range(0, len(name), 2):  # cut at the first UTF-16 NUL unit
        if name[i : i + 2] == b"\0\0":
            name = name[:i]
            break
    label = name.decode("utf-16-le", errors="replace").rstrip(" ") or None
    return Signature("f2fs", label, _uuid(sb[108:124]), FILESYSTEM)


# ext2_super_block feature bits (fs/ext4/ext4.h)
_EXT_COMPAT_HAS_JOURNAL = 0x4
_EXT_INCOMPAT_JOURNAL_DEV = 0x8
_EXT3_INCOMPAT_SUPP = 0x2 | 0x4 | 0x10  # FILETYPE, RECOVER, META_BG
_EXT3_RO_COMPAT_SUPP = 0x1 | 0x2 | 0x4  # SPARSE_SUPER, LARGE_FILE, BTREE_DIR


def _ext(h: bytes) -> Signature | None:
    # ext2_super_block at 1024: s_log_block_size @24, s_magic le16 0xEF53 @56,
    # s_feature_compat @92, s_feature_incompat @96, s_feature_ro_compat @100,
    # s_uuid[16] @104, s_volume_name[16] @120.
    sb = h[1024 : 1024 + 136]
    if len(sb) < 136 or _u16le(sb, 56) != 0xEF53 or _u32le(sb, 24) > 6:
        return None
    compat, incompat, ro_compat = _u32le(sb, 92), _u32le(sb, 96), _u32le(sb, 100)
    label, fsuuid = _label(sb[120:136]), _uuid(sb[104:120])
    if incompat & _EXT_INCOMPAT_JOURNAL_DEV:  # external journal device
        return Signature("jbd", label, fsuuid, OTHER)
    if incompat & ~_EXT3_INCOMPAT_SUPP or ro_compat & ~_EXT3_RO_COMPAT_SUPP:
        version = "ext4"  # EXTENTS, 64BIT, FLEX_BG, HUGE_FILE, GDT_CSUM, METADATA_CSUM, ...
    elif compat & _EXT_COMPAT_HAS_JOURNAL:
        version = "ext3"
    else:
        version = "ext2"
    return Signature("ext4", label, fsuuid, FILESYSTEM, version)


def _ntfs(h: bytes) -> Signature | None:
    # NTFS boot sector: OEM id "NTFS    " @3, bytes_per_sector le16 @11,
    # sectors_per_cluster @13, volume_serial le64 @72, 0x55AA @510.
    # The label lives in the $Volume MFT record, beyond the head: not reported.
    if len(h) < 512 or h[3:11] != b"NTFS    " or h[510:512] != b"\x55\xaa":
        return None
    if not _pow2(_u16le(h, 11), 256, 4096) or h[13] == 0:
        return None
    return Signature("ntfs", None, f"{_u64le(h, 72):016X}", FILESYSTEM)


def _vfat(h: bytes) -> Signature | None:
    # FAT boot sector (BPB): bytes_per_sector le16 @11, sectors_per_cluster @13,
    # reserved_sectors le16 @14, num_fats @16, 0x55AA @510.
    # FAT12/16: ext boot sig @38, volume id @39, label[11] @43, "FAT1x   " @54.
    # FAT32:    ext boot sig @66, volume id @67, label[11] @71, "FAT32   " @82.
    if len(h) < 512 or h[510:512] != b"\x55\xaa":
        return None
    if not _pow2(_u16le(h, 11), 512, 4096) or not _pow2(h[13], 1, 128):
        return None
    if _u16le(h, 14) == 0 or not 1 <= h[16] <= 4:
        return None
    if h[82:90] == b"FAT32   ":
        version, vid, raw_label = "FAT32", h[67:71], h[71:82]
    elif h[54:59] in (b"FAT12", b"FAT16"):
        version, vid, raw_label = h[54:59].decode("ascii"), h[39:43], h[43:54]
    else:
        return None
    label = _label(raw_label)
    if label == "NO NAME":
        label = None
    fsuuid = f"{vid[3]:02X}{vid[2]:02X}-{vid[1]:02X}{vid[0]:02X}" if any(vid) else None
    return Signature("vfat", label, fsuuid, FILESYSTEM, version)


def _swap(h: bytes) -> Signature | None:
    # swap_header: magic "SWAPSPACE2" (v1) or "SWAP-SPACE" (v0) in the last 10 bytes
    # of the first page; v1 info at 1024: version @0, uuid[16] @12, volume_name[16] @28.
    for page in (4096, 8192, 16384, 65536):
        magic = h[page - 10 : page]
        if magic == b"SWAP-SPACE":
            return Signature("swap", None, None, OTHER, "0")
        if magic == b"SWAPSPACE2":
            info = h[1024 : 1024 + 44]
            if _u32le(info, 0) != 1 and _u32be(info, 0) != 1:
                return None
            return Signature("swap", _label(info[28:44]), _uuid(info[12:28]), OTHER, "1")
    return None


# ---------------------------------------------------------------- partition tables


def _gpt(h: bytes) -> Signature | None:
    # gpt_header at LBA 1 (512- or 4096-byte sectors): "EFI PART" @0, header_size le32 @12,
    # header_crc32 @16, my_lba le64 @24, disk_guid (mixed-endian) @56.
    for sector in (512, 4096):
        hdr = h[sector : sector + 512]
        if len(hdr) < 92 or hdr[:8] != b"EFI PART" or _u64le(hdr, 24) != 1:
            continue
        size = _u32le(hdr, 12)
        if not 92 <= size <= len(hdr):
            continue
        body = hdr[:16] + b"\0\0\0\0" + hdr[20:size]
        if zlib.crc32(body) != _u32le(hdr, 16):
            continue
        guid = hdr[56:72]
        return Signature(
            "gpt",
            None,
            _uuid_text(guid[3::-1] + guid[5:3:-1] + guid[7:5:-1] + guid[8:]) if any(guid) else None,
            PARTITION_TABLE,
        )
    return None


def _dos(h: bytes) -> Signature | None:
    # MBR: disk signature le32 @440, 4 partition entries of 16 bytes @446
    # (boot flag @0, type @4, start LBA le32 @8, sectors le32 @12), 0x55AA @510.
    if len(h) < 512 or h[510:512] != b"\x55\xaa":
        return None
    if h[3:11] == b"NTFS    " or h[54:57] == b"FAT" or h[82:87] == b"FAT32":
        return None  # a (broken) volume boot record, not an MBR
    plausible = False
    for i in range(4):
        e = h[446 + 16 * i : 462 + 16 * i]
        if e[0] not in (0x00, 0x80):
            return None
        if e[4] != 0 and _u32le(e, 12) != 0:  # start may be 0 (isohybrid)
            plausible = True
    if not plausible:
        return None
    disk_id = _u32le(h, 440)
    return Signature("dos", None, f"{disk_id:08x}" if disk_id else None, PARTITION_TABLE)


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


# ---------------------------------------------------------------- public API


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

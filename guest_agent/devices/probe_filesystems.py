"""Signatures of filesystems (and swap) in the first bytes of a device; see probe.py for the order.

First the fields every signature reader reads: the `Signature` record, and readers of
raw bytes (little- and big-endian integers, labels, UUIDs), which the containers'
readers (`probe_containers`) use too. They are here, not in a module of their own,
because a volume found by LABEL or UUID imports every reader on a boot, and a module
is one more import there.
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


# --- the filesystems ---------------------------------------------------------------


def _iso9660(h: bytes) -> Signature | None:
    # Primary volume descriptor at 32 KiB (ECMA-119 8.4): type 1 @0, "CD001" @1,
    # volume identifier[32] @40, creation date @813, modification date @830 (17 bytes:
    # 16 ASCII digits + tz).  blkid derives UUID from the modification (else creation) date.
    pvd = h[0x8000 : 0x8000 + 2048]
    if len(pvd) < 2048 or pvd[1:6] != b"CD001" or pvd[0] != 1:
        return None
    return Signature(
        "iso9660",
        read_label(pvd[40:72]),
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
    if not pow2(u32be(h, 4), 512, 65536) or not pow2(u16be(h, 102), 512, 32768):
        return None
    return Signature("xfs", read_label(h[108:120]), read_uuid(h[32:48]), FILESYSTEM)


def _btrfs(h: bytes) -> Signature | None:
    # btrfs_super_block at 64 KiB: fsid[16] @32, bytenr le64 @48 (its own offset),
    # magic "_BHRfS_M" @64, label[256] @299.
    sb = h[BTRFS_SB : BTRFS_SB + 555]
    if len(sb) < 555 or sb[64:72] != b"_BHRfS_M" or u64le(sb, 48) != BTRFS_SB:
        return None
    return Signature("btrfs", read_label(sb[299:555]), read_uuid(sb[32:48]), FILESYSTEM)


def _erofs(h: bytes) -> Signature | None:
    # erofs_super_block at 1024: magic le32 0xE0F5E1E2 @0, blkszbits u8 @12,
    # uuid[16] @48, volume_name[16] @64.
    sb = h[1024 : 1024 + 80]
    if len(sb) < 80 or u32le(sb, 0) != 0xE0F5E1E2 or not 9 <= sb[12] <= 16:
        return None
    return Signature("erofs", read_label(sb[64:80]), read_uuid(sb[48:64]), FILESYSTEM)


def _squashfs(h: bytes) -> Signature | None:
    # squashfs_super_block: s_magic "hsqs" @0 (little-endian), s_major le16 @28,
    # s_minor le16 @30.  No label or UUID.  Pre-4.0 images are "squashfs3" (as blkid).
    if len(h) < 32 or h[:4] != b"hsqs":
        return None
    major, minor = u16le(h, 28), u16le(h, 30)
    if not 1 <= major <= 4:
        return None
    return Signature(
        "squashfs" if major == 4 else "squashfs3", None, None, FILESYSTEM, f"{major}.{minor}"
    )


def _f2fs(h: bytes) -> Signature | None:
    # f2fs_super_block at 1024: magic le32 0xF2F52010 @0, log_blocksize @16,
    # uuid[16] @108, volume_name: 512 UTF-16LE units @124.
    sb = h[1024 : 1024 + 124 + 1024]
    if len(sb) < 1148 or u32le(sb, 0) != 0xF2F52010 or not 9 <= u32le(sb, 16) <= 16:
        return None
    name = sb[124:1148]
    for i in range(0, len(name), 2):  # cut at the first UTF-16 NUL unit
        if name[i : i + 2] == b"\0\0":
            name = name[:i]
            break
    label = name.decode("utf-16-le", errors="replace").rstrip(" ") or None
    return Signature("f2fs", label, read_uuid(sb[108:124]), FILESYSTEM)


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
    if len(sb) < 136 or u16le(sb, 56) != 0xEF53 or u32le(sb, 24) > 6:
        return None
    compat, incompat, ro_compat = u32le(sb, 92), u32le(sb, 96), u32le(sb, 100)
    label, fsuuid = read_label(sb[120:136]), read_uuid(sb[104:120])
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
    if not pow2(u16le(h, 11), 256, 4096) or h[13] == 0:
        return None
    return Signature("ntfs", None, f"{u64le(h, 72):016X}", FILESYSTEM)


def _vfat(h: bytes) -> Signature | None:
    # FAT boot sector (BPB): bytes_per_sector le16 @11, sectors_per_cluster @13,
    # reserved_sectors le16 @14, num_fats @16, 0x55AA @510.
    # FAT12/16: ext boot sig @38, volume id @39, label[11] @43, "FAT1x   " @54.
    # FAT32:    ext boot sig @66, volume id @67, label[11] @71, "FAT32   " @82.
    if len(h) < 512 or h[510:512] != b"\x55\xaa":
        return None
    if not pow2(u16le(h, 11), 512, 4096) or not pow2(h[13], 1, 128):
        return None
    if u16le(h, 14) == 0 or not 1 <= h[16] <= 4:
        return None
    if h[82:90] == b"FAT32   ":
        version, vid, raw_label = "FAT32", h[67:71], h[71:82]
    elif h[54:59] in (b"FAT12", b"FAT16"):
        version, vid, raw_label = h[54:59].decode("ascii"), h[39:43], h[43:54]
    else:
        return None
    label = read_label(raw_label)
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
            if u32le(info, 0) != 1 and u32be(info, 0) != 1:
                return None
            return Signature("swap", read_label(info[28:44]), read_uuid(info[12:28]), OTHER, "1")
    return None

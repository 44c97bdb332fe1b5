"""Signatures of containers (md, LUKS, LVM2) and partition tables (GPT, DOS); see probe.py for the order."""

from __future__ import annotations

from guest_agent.devices.probe_filesystems import (
    OTHER,
    PARTITION_TABLE,
    Signature,
    read_label,
    read_uuid,
    u16be,
    u32le,
    u64le,
    uuid_text,
)


def _md(h: bytes) -> Signature | None:
    # mdp_superblock_1: magic le32 @0 (0xa92b4efc), major_version @4, set_uuid[16] @16,
    # set_name[32] @32, super_offset le64 @128 (sectors).  v1.1 sits at 0, v1.2 at 4 KiB.
    for off, version in ((0, "1.1"), (4096, "1.2")):
        sb = h[off : off + 256]
        if len(sb) < 256 or u32le(sb, 0) != 0xA92B4EFC:
            continue
        if u32le(sb, 4) != 1 or u64le(sb, 128) * 512 != off:
            continue
        return Signature(
            "linux_raid_member", read_label(sb[32:64]), read_uuid(sb[16:32]), OTHER, version
        )
    return None


def _luks(h: bytes) -> Signature | None:
    # luks_phdr / luks2_hdr_disk: magic "LUKS\xba\xbe" @0, version be16 @6,
    # LUKS2 label[48] @24, uuid[40] (ASCII) @168.
    if len(h) < 208 or h[:6] != b"LUKS\xba\xbe":
        return None
    version = u16be(h, 6)
    if version not in (1, 2):
        return None
    label = read_label(h[24:72]) if version == 2 else None
    return Signature("crypto_LUKS", label, read_label(h[168:208]), OTHER, str(version))


def _lvm2(h: bytes) -> Signature | None:
    # label_header in one of sectors 0..3: id "LABELONE" @0, sector_xl le64 @8,
    # offset_xl le32 @20, type "LVM2 001" @24; pv_header.pv_uuid[32] @offset_xl.
    for sector in range(4):
        lh = h[sector * 512 : sector * 512 + 512]
        if len(lh) < 512 or lh[:8] != b"LABELONE" or lh[24:32] != b"LVM2 001":
            continue
        if u64le(lh, 8) != sector:
            continue
        off = u32le(lh, 20)
        raw = lh[off : off + 32]
        pv = None
        if off >= 32 and len(raw) == 32:
            s = raw.decode("ascii", errors="replace")  # blkid prints it 6-4-4-4-4-4-6
            pv = "-".join((s[0:6], s[6:10], s[10:14], s[14:18], s[18:22], s[22:26], s[26:32]))
        return Signature("LVM2_member", None, pv, OTHER, "LVM2 001")
    return None


def _gpt(h: bytes) -> Signature | None:
    # gpt_header at LBA 1 (512- or 4096-byte sectors): "EFI PART" @0, header_size le32 @12,
    # header_crc32 @16, my_lba le64 @24, disk_guid (mixed-endian) @56.
    for sector in (512, 4096):
        hdr = h[sector : sector + 512]
        if len(hdr) < 92 or hdr[:8] != b"EFI PART" or u64le(hdr, 24) != 1:
            continue
        size = u32le(hdr, 12)
        if not 92 <= size <= len(hdr):
            continue
        import zlib  # only for a GPT header: not on every boot that probes

        body = hdr[:16] + b"\0\0\0\0" + hdr[20:size]
        if zlib.crc32(body) != u32le(hdr, 16):
            continue
        guid = hdr[56:72]
        return Signature(
            "gpt",
            None,
            uuid_text(guid[3::-1] + guid[5:3:-1] + guid[7:5:-1] + guid[8:]) if any(guid) else None,
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
        if e[4] != 0 and u32le(e, 12) != 0:  # start may be 0 (isohybrid)
            plausible = True
    if not plausible:
        return None
    disk_id = u32le(h, 440)
    return Signature("dos", None, f"{disk_id:08x}" if disk_id else None, PARTITION_TABLE)

"""Tests for guest_agent.devices.probe: real images made with the real mkfs tools, blkid as the oracle.

Every image test needs its tool; a missing tool FAILS (not skips) and names the Debian
package to install: e2fsprogs util-linux fdisk gdisk dosfstools xfsprogs btrfs-progs
squashfs-tools erofs-utils f2fs-tools genisoimage cryptsetup-bin ntfs-3g.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest_agent.devices.probe import PROBE_SIZE, Signature, probe_bytes, probe_device

MiB = 1 << 20

# tool -> Debian 12 package that ships it
PACKAGES = {
    "blkid": "util-linux",
    "mkswap": "util-linux",
    "mkfs.ext2": "e2fsprogs",
    "mkfs.ext3": "e2fsprogs",
    "mkfs.ext4": "e2fsprogs",
    "sfdisk": "fdisk",
    "sgdisk": "gdisk",
    "mkfs.vfat": "dosfstools",
    "mkfs.xfs": "xfsprogs",
    "mkfs.btrfs": "btrfs-progs",
    "mksquashfs": "squashfs-tools",
    "mkfs.erofs": "erofs-utils",
    "mkfs.f2fs": "f2fs-tools",
    "genisoimage": "genisoimage",
    "cryptsetup": "cryptsetup-bin",
    "mkntfs": "ntfs-3g",
}


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        pytest.fail(
            f"{name} not found: install it with "
            f"`apt-get install -y --no-install-recommends {PACKAGES.get(name, name)}`",
            pytrace=False,
        )
    return path


def run(*argv: str, stdin: str | None = None) -> None:
    res = subprocess.run(
        [tool(argv[0]), *argv[1:]], input=stdin, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, f"{argv} failed ({res.returncode}): {res.stderr or res.stdout}"


def blkid(path: Path) -> dict[str, str]:
    res = subprocess.run(
        [tool("blkid"), "-p", "-o", "export", str(path)], capture_output=True, text=True
    )
    assert res.returncode == 0, f"blkid found nothing on {path}: {res.stderr}"
    return dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)


def sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def tree(tmp: Path) -> Path:
    src = tmp / "src"
    (src / "dir").mkdir(parents=True)
    (src / "hello.txt").write_text("hello\n")
    (src / "dir" / "data.bin").write_bytes(os.urandom(5000))
    return src


# ------------------------------------------------------------------ image builders

U1 = "3f1c7c1e-5b4a-4c2e-9d8f-0123456789ab"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], Path]
    fstype: str
    label: str | None
    uuid: str | None
    usage: str
    version: str | None = None


def _ext(kind: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = sparse(tmp / "img", 16 * MiB)
        run(f"mkfs.{kind}", "-q", "-F", "-L", f"my{kind}", "-U", U1, str(img))
        return img

    return build


def _vfat(bits: int, size: int) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = sparse(tmp / "img", size)
        run("mkfs.vfat", "-F", str(bits), "-n", f"FAT{bits}LBL", "-i", "1234ABCD", str(img))
        return img

    return build


def _vfat_noname(tmp: Path) -> Path:
    img = sparse(tmp / "img", 16 * MiB)
    run("mkfs.vfat", "-F", "16", "-i", "0badcafe", str(img))
    return img


def _swap(tmp: Path) -> Path:
    img = sparse(tmp / "img", 8 * MiB)
    run("mkswap", "-L", "myswap", "-U", U1, str(img))
    return img


def _xfs(tmp: Path) -> Path:
    img = sparse(tmp / "img", 320 * MiB)
    run("mkfs.xfs", "-q", "-f", "-L", "myxfs", "-m", f"uuid={U1}", str(img))
    return img


def _btrfs(tmp: Path) -> Path:
    img = sparse(tmp / "img", 128 * MiB)
    run("mkfs.btrfs", "-q", "-f", "-L", "mybtrfs", "-U", U1, str(img))
    return img


def _squashfs(tmp: Path) -> Path:
    img = tmp / "img"
    run("mksquashfs", str(tree(tmp)), str(img), "-noappend", "-quiet", "-no-progress")
    return img


def _erofs(tmp: Path) -> Path:
    img = tmp / "img"
    run("mkfs.erofs", "--quiet", f"-U{U1}", str(img), str(tree(tmp)))
    return img


def _f2fs(tmp: Path) -> Path:
    img = sparse(tmp / "img", 64 * MiB)
    run("mkfs.f2fs", "-q", "-f", "-l", "myf2fs", "-U", U1, str(img))
    return img


def _iso(tmp: Path) -> Path:
    img = tmp / "img"
    run("genisoimage", "-quiet", "-V", "MY_ISO", "-o", str(img), str(tree(tmp)))
    return img


def _luks(version: int) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        img = sparse(tmp / "img", 32 * MiB)
        key = tmp / "key"
        key.write_bytes(b"secret")
        argv = ["cryptsetup", "luksFormat", "--batch-mode", f"--type=luks{version}"]
        argv += [f"--uuid={U1}", f"--key-file={key}", "--pbkdf=pbkdf2"]
        argv += ["--pbkdf-force-iterations=1000", str(img)]
        if version == 2:
            argv.insert(-1, "--label=myluks")
        run(*argv)
        return img

    return build


def _ntfs(tmp: Path) -> Path:
    img = sparse(tmp / "img", 16 * MiB)
    run("mkntfs", "-q", "-F", "-Q", "-L", "myntfs", str(img))
    return img


def _dos(tmp: Path) -> Path:
    img = sparse(tmp / "img", 16 * MiB)
    run("sfdisk", "-q", str(img), stdin="label: dos\nlabel-id: 0x1234abcd\n,4MiB,L\n,,83\n")
    return img


def _gpt(tmp: Path) -> Path:
    img = sparse(tmp / "img", 16 * MiB)
    run("sgdisk", "-n", "1:2048:+4M", "-t", "1:8300", "-U", U1, str(img))
    return img


CASES = [
    Case("ext2", _ext("ext2"), "ext4", "myext2", U1, "filesystem", "ext2"),
    Case("ext3", _ext("ext3"), "ext4", "myext3", U1, "filesystem", "ext3"),
    Case("ext4", _ext("ext4"), "ext4", "myext4", U1, "filesystem", "ext4"),
    Case("fat12", _vfat(12, 8 * MiB), "vfat", "FAT12LBL", "1234-ABCD", "filesystem", "FAT12"),
    Case("fat16", _vfat(16, 32 * MiB), "vfat", "FAT16LBL", "1234-ABCD", "filesystem", "FAT16"),
    Case("fat32", _vfat(32, 64 * MiB), "vfat", "FAT32LBL", "1234-ABCD", "filesystem", "FAT32"),
    Case("vfat-noname", _vfat_noname, "vfat", None, "0BAD-CAFE", "filesystem", "FAT16"),
    Case("swap", _swap, "swap", "myswap", U1, "other", "1"),
    Case("xfs", _xfs, "xfs", "myxfs", U1, "filesystem"),
    Case("btrfs", _btrfs, "btrfs", "mybtrfs", U1, "filesystem"),
    Case("squashfs", _squashfs, "squashfs", None, None, "filesystem", "4.0"),
    Case("erofs", _erofs, "erofs", None, U1, "filesystem"),
    Case("f2fs", _f2fs, "f2fs", "myf2fs", U1, "filesystem"),
    Case("iso9660", _iso, "iso9660", "MY_ISO", "*", "filesystem"),  # uuid = date, from blkid
    Case("luks1", _luks(1), "crypto_LUKS", None, U1, "other", "1"),
    Case("luks2", _luks(2), "crypto_LUKS", "myluks", U1, "other", "2"),
    Case("ntfs", _ntfs, "ntfs", None, "*", "filesystem"),  # serial is random; label: see below
    Case("dos", _dos, "dos", None, "1234abcd", "partition-table"),
    Case("gpt", _gpt, "gpt", None, U1, "partition-table"),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Case, Path]:
    case: Case = request.param
    return case, case.build(tmp_path)


def test_probe_device_matches_blkid(image: tuple[Case, Path]) -> None:
    case, img = image
    sig = probe_device(str(img))
    assert sig is not None, f"{case.name}: no signature found"
    assert (sig.fstype, sig.usage, sig.version) == (case.fstype, case.usage, case.version)
    assert sig.label == case.label
    if case.uuid != "*":
        assert sig.uuid == case.uuid

    info = blkid(img)  # the oracle
    if case.usage == "partition-table":
        assert info["PTTYPE"] == sig.fstype
        assert info.get("PTUUID") == sig.uuid
        return
    assert info["TYPE"] == (sig.version if sig.fstype == "ext4" else sig.fstype)
    assert info.get("UUID") == sig.uuid
    if case.name == "ntfs":
        # The NTFS label lives in the $Volume MFT record, beyond the probed head.
        assert info.get("LABEL") == "myntfs"
    else:
        assert info.get("LABEL") == sig.label


def test_probe_bytes_agrees_with_probe_device(image: tuple[Case, Path]) -> None:
    _, img = image
    head = img.read_bytes()[:PROBE_SIZE]
    assert probe_bytes(head) == probe_device(str(img))
    assert probe_bytes(img.read_bytes()[: 4 * PROBE_SIZE]) == probe_bytes(head)


def test_truncated_and_mutated_heads_never_raise(image: tuple[Case, Path]) -> None:
    _, img = image
    head = img.read_bytes()[:PROBE_SIZE]
    cuts = {0, 1, 2, 3, 11, 440, 510, 511, 512, 513, 1023, 1024, 1080, 1100, 2048, 4086}
    cuts |= {4095, 4096, 4100, 4352, 32768, 32769, 34815, 34816, 65536, 65600, 65835}
    cuts |= set(range(0, PROBE_SIZE, 997))
    for n in sorted(cuts):
        sig = probe_bytes(head[:n])
        assert sig is None or isinstance(sig, Signature)
    rng = random.Random(1234)
    for _ in range(300):
        buf = bytearray(head)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        sig = probe_bytes(bytes(buf[: rng.randint(0, len(buf))]))
        assert sig is None or isinstance(sig, Signature)


# ------------------------------------------------------------------ pure tests


@pytest.mark.parametrize("size", [0, 1, 7, 511, 512, 1024, 1100, 4096, 32769, PROBE_SIZE])
@pytest.mark.parametrize("fill", [b"\0", b"\xff", b" ", b"\x55\xaa"])
def test_uniform_buffers_are_nothing(size: int, fill: bytes) -> None:
    assert probe_bytes((fill * size)[:size]) is None


def test_random_garbage_never_raises() -> None:
    rng = random.Random(42)
    for _ in range(500):
        size = rng.choice([0, 1, 100, 511, 512, 2048, 4096, 40000, PROBE_SIZE, PROBE_SIZE + 10])
        sig = probe_bytes(rng.randbytes(size))
        assert sig is None or isinstance(sig, Signature)


def _with(buf: bytearray, off: int, data: bytes) -> bytearray:
    buf[off : off + len(data)] = data
    return buf


def test_magic_alone_in_short_buffer_is_none() -> None:
    # A magic at its offset but the rest of the structure cut off: None, no exception.
    for off, magic in [
        (0, b"XFSB"),
        (0, b"LUKS\xba\xbe"),
        (0, b"hsqs"),
        (1080, b"\x53\xef"),
        (1024, b"\xe2\xe1\xf5\xe0"),
        (1024, b"\x10\x20\xf5\xf2"),
        (65600, b"_BHRfS_M"),
        (32769, b"CD001"),
        (512, b"LABELONE"),
        (512, b"EFI PART"),
        (4086, b"SWAPSPACE2"),
    ]:
        buf = bytes(_with(bytearray(off + len(magic)), off, magic))
        assert probe_bytes(buf) is None, magic


def md_superblock(offset: int, set_uuid: bytes, name: bytes) -> bytes:
    # mdp_superblock_1: magic, major_version, feature_map, pad0, set_uuid, set_name, ...
    sb = bytearray(256)
    struct.pack_into("<III4x16s32s", sb, 0, 0xA92B4EFC, 1, 0, set_uuid, name)
    struct.pack_into("<Q", sb, 128, offset // 512)  # super_offset, in sectors
    return bytes(sb)


@pytest.mark.parametrize(("offset", "version"), [(0, "1.1"), (4096, "1.2")])
def test_md_raid_v1(offset: int, version: str) -> None:
    u = uuid.UUID(U1)
    head = bytes(_with(bytearray(PROBE_SIZE), offset, md_superblock(offset, u.bytes, b"host:0")))
    assert probe_bytes(head) == Signature("linux_raid_member", "host:0", U1, "other", version)
    # super_offset must point at the superblock itself
    wrong = md_superblock(offset, u.bytes, b"host:0")
    wrong = wrong[:128] + struct.pack("<Q", 99) + wrong[136:]
    assert probe_bytes(bytes(_with(bytearray(PROBE_SIZE), offset, wrong))) is None


def test_md_wins_over_filesystem_inside() -> None:
    # md v1.2 member whose first 4 KiB still carry an ext superblock copy.
    buf = bytearray(PROBE_SIZE)
    _with(buf, 1024 + 56, b"\x53\xef")
    _with(buf, 4096, md_superblock(4096, uuid.UUID(U1).bytes, b"h:0"))
    sig = probe_bytes(bytes(buf))
    assert sig is not None and sig.fstype == "linux_raid_member"


def test_lvm2_label() -> None:
    pv = b"AbCdEf0123456789GhIjKlMnOpQrStUv"
    lh = bytearray(512)
    struct.pack_into("<8sQII8s32s", lh, 0, b"LABELONE", 1, 0, 32, b"LVM2 001", pv)
    head = bytes(_with(bytearray(PROBE_SIZE), 512, bytes(lh)))
    assert probe_bytes(head) == Signature(
        "LVM2_member", None, "AbCdEf-0123-4567-89Gh-IjKl-MnOp-QrStUv", "other", "LVM2 001"
    )
    # sector_xl must name the sector the label is in
    struct.pack_into("<Q", lh, 8, 3)
    assert probe_bytes(bytes(_with(bytearray(PROBE_SIZE), 512, bytes(lh)))) is None


def test_gpt_with_bad_crc_is_not_gpt(tmp_path: Path) -> None:
    head = bytearray(_gpt(tmp_path).read_bytes()[:PROBE_SIZE])
    head[512 + 56] ^= 0xFF  # corrupt the disk GUID: header CRC no longer matches
    sig = probe_bytes(bytes(head))
    assert sig is not None and sig.fstype == "dos"  # only the protective MBR is left


def test_iso_with_mbr_is_still_iso(tmp_path: Path) -> None:
    # isohybrid: an MBR with a partition entry in the system area of an iso9660 image.
    head = bytearray(_iso(tmp_path).read_bytes()[:PROBE_SIZE])
    entry = struct.pack("<B3sB3sII", 0x80, b"\0\0\0", 0x17, b"\0\0\0", 0, 2048)
    _with(head, 446, entry)
    _with(head, 510, b"\x55\xaa")
    sig = probe_bytes(bytes(head))
    assert sig is not None and sig.fstype == "iso9660"
    head[0x8001:0x8006] = b"XXXXX"
    sig = probe_bytes(bytes(head))
    assert sig is not None and sig.fstype == "dos"


def test_fat_boot_sector_is_not_dos(tmp_path: Path) -> None:
    head = bytearray(_vfat(16, 32 * MiB)(tmp_path).read_bytes()[:PROBE_SIZE])
    head[11:13] = b"\x00\x00"  # break the BPB: no longer vfat, and still not an MBR
    assert probe_bytes(bytes(head)) is None


def test_swap_v1_other_page_size() -> None:
    buf = bytearray(PROBE_SIZE)
    struct.pack_into("<III16s16s", buf, 1024, 1, 100, 0, uuid.UUID(U1).bytes, b"big")
    _with(buf, 16384 - 10, b"SWAPSPACE2")
    assert probe_bytes(bytes(buf)) == Signature("swap", "big", U1, "other", "1")


def test_label_decoding_replaces_invalid_utf8(tmp_path: Path) -> None:
    head = bytearray(_ext("ext4")(tmp_path).read_bytes()[:PROBE_SIZE])
    _with(head, 1024 + 120, b"ab\xffcd\0\0\0\0\0\0\0\0\0\0\0")
    sig = probe_bytes(bytes(head))
    assert sig is not None and sig.label == "ab\ufffdcd"


def test_missing_device_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        probe_device(str(tmp_path / "nope"))

"""x-makefs's blank check (guest_agent.devices.blank.why_not_blank) on real loop devices, as root.

Every disk is all zeros but for what a case puts on it: the disks of issue 8 that the old
check let x-makefs format (a tar archive at 1 MiB, an ext4 at 1 MiB with its partition table
wiped, a VMFS header at 1 MiB, data in the middle, data in one sample), every signature the
host's mkfs tools make at its natural offset, and signature magics for further types
``blkid -k`` lists, written here as data. The oracle for all of them: whatever ``blkid -p``
recognises on the device, why_not_blank refuses (with libblkid's own name for it). A fresh
all-zero disk is blank. Loop devices are detached afterwards, also when a test fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from guest_agent.devices.blank import SAMPLE, sample_offsets, why_not_blank

if TYPE_CHECKING:
    from tests.host.conftest import HostEnv

pytestmark = pytest.mark.root

MiB = 1 << 20

# tool -> the Debian package that ships it (all in tools/setup-testbed's HOST_PACKAGES)
PACKAGES = {
    "blkid": "util-linux", "mkswap": "util-linux", "sfdisk": "fdisk", "tar": "tar",
    "mkfs.ext2": "e2fsprogs", "mkfs.ext3": "e2fsprogs", "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs", "mkfs.btrfs": "btrfs-progs", "mkfs.vfat": "dosfstools",
    "mkfs.f2fs": "f2fs-tools", "mkntfs": "ntfs-3g", "cryptsetup": "cryptsetup-bin",
    "mksquashfs": "squashfs-tools", "mkfs.erofs": "erofs-utils", "genisoimage": "genisoimage",
}  # fmt: skip


def run(*argv: str, cwd: Path | None = None) -> None:
    tool = shutil.which(argv[0]) or shutil.which(argv[0], path="/usr/sbin:/sbin:/usr/bin:/bin")
    if tool is None:
        pytest.fail(
            f"{argv[0]} not found: apt-get install {PACKAGES.get(argv[0], argv[0])} "
            "(tools/setup-testbed installs it)",
            pytrace=False,
        )
    done = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, f"{argv}: {done.stderr or done.stdout}"


def blkid_p(dev: str, *extra: str) -> dict[str, str]:
    """What `blkid -p` finds on dev ({} for nothing); fails on blkid's own errors."""
    done = subprocess.run(["blkid", "-p", "-o", "export", *extra, dev], capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode == 2:  # nothing found
        return {}
    found = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    if done.returncode == 0:
        return found
    assert "ambivalent" in done.stderr, f"blkid -p {dev}: {done.returncode} {done.stderr}"
    return {"AMBIVALENT": done.stderr.strip()}


def libblkid_reason(found: dict[str, str]) -> str:
    """The reason why_not_blank gives for what `blkid -p` found (both ask libblkid)."""
    if "AMBIVALENT" in found:
        return "holds more than one signature (libblkid: ambiguous)"
    if "TYPE" in found:
        return f"holds {found['TYPE']} (libblkid)"
    return f"holds a {found['PTTYPE']} partition table (libblkid)"


def check(dev: str) -> tuple[dict[str, str], str | None]:
    """The oracle, for every disk: if blkid -p sees anything, why_not_blank refuses."""
    found = blkid_p(dev)
    reason = why_not_blank(dev)
    if found:
        assert reason == libblkid_reason(found), (found, reason)
    return found, reason


def write_at(image: Path, offset: int, data: bytes) -> None:
    with open(image, "r+b") as f:
        f.seek(offset if offset >= 0 else os.path.getsize(image) + offset)
        f.write(data)


def sha256(path: Path) -> str:
    os.sync()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_tree(base: Path) -> Path:
    src = base / "tree"
    (src / "dir").mkdir(parents=True, exist_ok=True)
    (src / "hello.txt").write_text("hello\n")
    (src / "dir" / "data.bin").write_bytes(os.urandom(5000))
    return src


# --- a fresh disk, and the disks of issue 8 ---------------------------------------------


def test_fresh_all_zero_disk_is_blank(host: HostEnv) -> None:
    dev = host.attach(host.image("zero", 256))
    assert check(dev) == ({}, None)


def test_tar_archive_at_1_mib_is_not_blank(host: HostEnv) -> None:
    image = host.image("tar", 64)
    tar = host.base / "a.tar"
    run("tar", "-cf", str(tar), "-C", str(small_tree(host.base)), ".")
    write_at(image, MiB, tar.read_bytes())
    dev = host.attach(image)
    # libblkid knows no tar: only the zero check sees it (the old one read the first MiB only)
    assert check(dev) == ({}, f"has data at offset {MiB}")


def test_ext4_at_1_mib_with_its_partition_table_wiped_is_not_blank(host: HostEnv) -> None:
    fs = host.image("fs", 32)
    run("mkfs.ext4", "-q", "-F", "-L", "precious", str(fs))
    image = host.image("disk", 64)
    write_at(image, MiB, fs.read_bytes())
    dev = host.attach(image)
    assert blkid_p(dev, "-O", str(MiB)).get("TYPE") == "ext4"  # it is there, at 1 MiB
    found, reason = check(dev)
    assert found == {}  # blkid -p on the disk sees nothing ...
    assert reason is not None and reason.startswith("has data at offset ")  # ... we do
    assert MiB <= int(reason.rsplit(" ", 1)[1]) < MiB + 4096


def test_vmfs_header_at_1_mib_is_not_blank(host: HostEnv) -> None:
    image = host.image("vmfs", 64)
    write_at(image, MiB, VMFS_VOLUME_MEMBER)
    dev = host.attach(image)
    found, reason = check(dev)
    assert found.get("TYPE") == "VMFS_volume_member", "blkid -p must recognise the header"
    assert reason == "holds VMFS_volume_member (libblkid)"


def test_random_bytes_in_the_middle_are_not_blank(host: HostEnv) -> None:
    image = host.image("middle", 256)
    start = 124 * MiB
    data = b"\xff" + os.urandom(8 * MiB - 1)  # more than the gap between two samples
    write_at(image, start, data)
    dev = host.attach(image)
    found, reason = check(dev)
    assert found == {}
    assert reason is not None and reason.startswith("has data at offset ")
    assert start <= int(reason.rsplit(" ", 1)[1]) < start + len(data)


def test_random_bytes_in_one_sample_and_nowhere_else_are_not_blank(host: HostEnv) -> None:
    size = 256 * MiB
    offset = sample_offsets(size)[37] + SAMPLE - 600  # near the end of one sample
    image = host.image("sample", 256)
    write_at(image, offset, b"\x01" + os.urandom(511))
    dev = host.attach(image)
    assert check(dev) == ({}, f"has data at offset {offset}")


# --- signatures made by the host's tools, each at its natural offset on a zero disk -----


def fs_image(tool: str, *args: str) -> Callable[[Path, Path], None]:
    def make(image: Path, base: Path) -> None:
        run(tool, *args, str(image))

    return make


def luks(kind: str) -> Callable[[Path, Path], None]:
    def make(image: Path, base: Path) -> None:
        key = base / "key"
        key.write_bytes(b"k")
        run("cryptsetup", "luksFormat", "-q", "--type", kind, "--pbkdf", "pbkdf2",
            "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(image))  # fmt: skip

    return make


def copied(build: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
    """A tool that writes a file of its own: copy the file to the start of the disk."""

    def make(image: Path, base: Path) -> None:
        out = base / "out.img"
        build(out, small_tree(base))
        write_at(image, 0, out.read_bytes())

    return make


def sfdisk(script: str) -> Callable[[Path, Path], None]:
    def make(image: Path, base: Path) -> None:
        done = subprocess.run(["sfdisk", "-q", str(image)], input=script, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr

    return make


def ext4_in_partition(image: Path, base: Path) -> None:
    sfdisk("label: dos\nstart=2048, type=83\n")(image, base)
    fs = base / "fs.img"
    with open(fs, "wb") as f:
        f.truncate(32 * MiB)
    run("mkfs.ext4", "-q", "-F", str(fs))
    write_at(image, MiB, fs.read_bytes())


@dataclass(frozen=True)
class Made:
    name: str
    size_mib: int
    make: Callable[[Path, Path], None]


MADE = [
    Made("ext2", 64, fs_image("mkfs.ext2", "-q", "-F")),
    Made("ext3", 64, fs_image("mkfs.ext3", "-q", "-F")),
    Made("ext4", 64, fs_image("mkfs.ext4", "-q", "-F")),
    Made("xfs", 320, fs_image("mkfs.xfs", "-q", "-f")),  # xfsprogs 6 wants 300 MiB
    Made("btrfs", 128, fs_image("mkfs.btrfs", "-q", "-f")),  # 114 MiB at least
    Made("vfat-fat16", 64, fs_image("mkfs.vfat", "-F", "16")),
    Made("vfat-fat32", 64, fs_image("mkfs.vfat", "-F", "32")),
    Made("f2fs", 64, fs_image("mkfs.f2fs", "-q", "-f")),
    Made("ntfs", 64, fs_image("mkntfs", "-q", "-F", "-Q")),
    Made("swap", 64, fs_image("mkswap")),
    Made("luks1", 64, luks("luks1")),
    Made("luks2", 64, luks("luks2")),
    Made(
        "squashfs",
        64,
        copied(lambda out, src: run("mksquashfs", str(src), str(out), "-quiet", "-noappend")),
    ),
    Made("erofs", 64, copied(lambda out, src: run("mkfs.erofs", "--quiet", str(out), str(src)))),
    Made(
        "iso9660",
        64,
        copied(
            lambda out, src: run("genisoimage", "-quiet", "-V", "ISO", "-o", str(out), str(src))
        ),
    ),
    Made("dos-table", 64, sfdisk("label: dos\nstart=2048, type=83\n")),
    Made("gpt-table", 64, sfdisk("label: gpt\nstart=2048, size=16MiB\n")),
    Made("dos-table-with-ext4", 64, ext4_in_partition),
]


@pytest.mark.parametrize("case", MADE, ids=lambda c: c.name)
def test_signature_made_by_a_tool_is_not_blank(host: HostEnv, case: Made) -> None:
    image = host.image(case.name, case.size_mib)
    case.make(image, host.base)
    dev = host.attach(image)
    found, reason = check(dev)
    assert found, f"blkid -p does not recognise the {case.name} image: the case proves nothing"
    assert reason is not None


# --- signature magics written as data, for types no tool here makes --------------------


def le16(v: int) -> bytes:
    return struct.pack("<H", v)


def le32(v: int) -> bytes:
    return struct.pack("<I", v)


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def lvm2_label(size: int) -> bytes:
    """An LVM2 label_header + pv_header in sector 1, with LVM's CRC (init 0xf597a6cf)."""
    sec = bytearray(512)
    sec[0:8] = b"LABELONE"
    sec[8:16] = struct.pack("<Q", 1)  # sector_xl: where the label is
    sec[20:24] = le32(32)  # offset_xl of the pv_header
    sec[24:32] = b"LVM2 001"
    sec[32:64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"  # pv uuid
    sec[64:72] = struct.pack("<Q", size)
    sec[16:20] = le32(~zlib.crc32(bytes(sec[20:]), ~0xF597A6CF & 0xFFFFFFFF) & 0xFFFFFFFF)
    return bytes(sec)


VMFS_VOLUME_MEMBER = b"\x0d\xd0\x01\xc0" + le32(14)  # vmfs.c: magic at 1 MiB, then version
SIZE = 64 * MiB  # every disk below; a negative offset counts from its end

# blkid TYPE -> [(offset, bytes)]: magics and the few fields libblkid's prober checks
# (util-linux libblkid/src/superblocks/*.c); each case is proven by `blkid -p` first.
MAGICS: dict[str, list[tuple[int, bytes]]] = {
    "VMFS_volume_member": [(MiB, VMFS_VOLUME_MEMBER)],
    "VMFS": [(2 * MiB, b"\x5e\xf1\xab\x2f" + le32(14))],
    "LVM2_member": [(512, lvm2_label(SIZE))],
    "LVM1_member": [(0, b"HM" + le16(1))],
    "linux_raid_member": [
        (-64 * 1024, le32(0xA92B4EFC) + le32(0) + le32(90))
    ],  # md 0.90, at the end
    "isw_raid_member": [(-1024, b"Intel Raid ISM Cfg Sig. 1.0.00")],  # second-last sector
    "swsuspend": [(4096 - 10, b"S1SUSPEND\0")],
    "swap": [(4096 - 10, b"SWAP-SPACE")],  # swap v0: no tool makes it any more
    "romfs": [(0, b"-rom1fs-" + be32(4096) + be32(0) + b"lbl\0")],
    "cramfs": [(0, le32(0x28CD3D45) + le32(4096) + bytes(8) + b"Compressed ROMFS")],
    "squashfs3": [(0, b"hsqs" + bytes(24) + le16(3) + le16(1))],
    "bfs": [(0, le32(0x1BADFACE) + le32(512) + le32(SIZE))],
    "vxfs": [(1024, le32(0xA501FCF5) + le32(1))],
    "nss": [(4096, b"SPB5")],
    "ubi": [(0, b"UBI#\x01")],
    "ubifs": [(0, le32(0x06101831) + bytes(16) + b"\x06")],
    "vdo": [(0, b"dmvdo001")],
    "DM_verity_hash": [(0, b"verity\0\0" + le32(1) + le32(1))],
    "DM_integrity": [(0, b"integrt\0\x01")],
    "DM_snapshot_cow": [(0, b"SnAp" + le32(1) + le32(1) + le32(16))],
    "ReFS": [(0, b"\0\0\0ReFS\0FSRS")],
    "ceph_bluestore": [(0, b"bluestore block device\n")],
    "oracleasm": [(32, b"ORCLDISKLABEL")],
    "gfs2": [(65536, be32(0x01161970) + be32(1) + bytes(16) + be32(1801) + be32(1900))],
    "gfs": [(65536, be32(0x01161970) + be32(1) + bytes(16) + be32(1309) + be32(1401))],
    "hpfs": [
        (8192, le32(0xF995E849) + le32(0xFA53E9C5) + b"\x02"),
        (8192 + 512, le32(0xF9911849) + le32(0xFA5229C5)),
    ],
    "hfsplus": [(1024, b"H+\x00\x04" + bytes(36) + be32(4096))],
    "minix": [
        (
            1024,
            le16(64)
            + le16(64)
            + le16(1)
            + le16(1)
            + le16(3)
            + le16(0)
            + le32(0x10081C00)
            + le16(0x137F),
        )
    ],
    "exfat": [(0, b"\xeb\x76\x90EXFAT   ")],
    "zonefs": [(0, b"SFOZ")],
}


@pytest.mark.parametrize("fstype", sorted(MAGICS))
def test_signature_written_as_data_is_not_blank(host: HostEnv, fstype: str) -> None:
    image = host.image(fstype, SIZE // MiB)
    for offset, data in MAGICS[fstype]:
        write_at(image, offset, data)
    dev = host.attach(image)
    found, reason = check(dev)
    if found.get("TYPE") != fstype:
        pytest.skip(f"NOT TESTED: blkid -p does not recognise our {fstype} magic ({found})")
    assert reason == f"holds {fstype} (libblkid)"


def test_the_magics_are_types_blkid_knows() -> None:
    known = set(subprocess.run(["blkid", "-k"], capture_output=True, text=True,
                               check=True).stdout.split())  # fmt: skip
    assert set(MAGICS) <= known, set(MAGICS) - known


# --- end to end, through the CLI ----------------------------------------------------------


def test_cli_makefs_refuses_a_tar_archive_at_1_mib(host: HostEnv) -> None:
    image = host.image("tar-cli", 64)
    tar = host.base / "a.tar"
    run("tar", "-cf", str(tar), "-C", str(small_tree(host.base)), ".")
    write_at(image, MiB, tar.read_bytes())
    before = sha256(image)
    dev = host.attach(image)
    spec = f"microvm.volume={dev}:/scratch:ext4:x-makefs"
    host.set_cmdline(spec)
    run_ = host.mount_all()
    host.umount_all()
    host.detach_all()
    assert sha256(image) == before, "the disk was written to"
    assert run_.returncode == 1, run_.stderr
    assert len(run_.lines) == 1 and run_.lines[0].startswith(f"error: {spec}: {dev} ")
    assert "not blank" in run_.lines[0] and f"has data at offset {MiB}" in run_.lines[0]

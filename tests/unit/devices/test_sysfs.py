"""Discovery from fake sysfs trees shaped like kernels 6.1 (Debian 12) and 6.12."""

from __future__ import annotations

import os
from typing import Any

import pytest

from guest_agent.devices.sysfs import (
    BlockDevice,
    VirtioShare,
    parse_devnum,
    parse_virtio_id,
    scan_block_devices,
    scan_shares,
    virtio_devices,
    virtio_transport,
    virtiofs_tags_readable,
)
from guest_agent.kernel.mountinfo import devnum, major_minor

PCI = "/sys/devices/pci0000:00"


def virtio_dev(fs: Any, n: int, slot: int, devid: int, driver: str | None, **attrs: bytes) -> str:
    """A virtio device under a PCI function, linked from /sys/bus/virtio/devices."""
    path = f"{PCI}/0000:00:{slot:02x}.0/virtio{n}"
    fs.create_file(f"{path}/device", contents=f"0x{devid:04x}\n")
    fs.create_file(f"{path}/vendor", contents="0x1af4\n")
    fs.create_file(f"{path}/modalias", contents=f"virtio:d{devid:08X}v00001AF4\n")
    for name, value in attrs.items():
        fs.create_file(f"{path}/{name}", contents=value)
    if driver:
        os.makedirs(f"/sys/bus/virtio/drivers/{driver}", exist_ok=True)
        fs.create_symlink(f"{path}/driver", f"../../../../bus/virtio/drivers/{driver}")
    fs.create_symlink(
        f"/sys/bus/virtio/devices/virtio{n}",
        f"../../../devices/pci0000:00/0000:00:{slot:02x}.0/virtio{n}",
    )
    return path


@pytest.fixture
def kernel_6_1(fs: Any) -> Any:
    """9p (mount_tag with its trailing NUL), two virtiofs devices, no /sys/fs/virtiofs."""
    virtio_dev(fs, 0, 2, 2, "virtio_blk")
    virtio_dev(fs, 1, 3, 9, "9pnet_virtio", mount_tag=b"ro-store\x00")
    virtio_dev(fs, 2, 4, 26, "virtio_fs")
    virtio_dev(fs, 3, 5, 9, None)  # 9p device whose driver is not bound yet: no mount_tag
    virtio_dev(fs, 10, 6, 26, "virtio_fs")  # natural order: virtio10 after virtio3
    return fs


def test_virtio_devices_6_1(kernel_6_1: Any) -> None:
    assert virtio_devices() == [
        ("virtio0", 2, "virtio_blk"),
        ("virtio1", 9, "9pnet_virtio"),
        ("virtio2", 26, "virtio_fs"),
        ("virtio3", 9, None),
        ("virtio10", 26, "virtio_fs"),
    ]


def test_shares_6_1_virtiofs_tags_unreadable(kernel_6_1: Any) -> None:
    assert not virtiofs_tags_readable()
    assert scan_shares() == [
        VirtioShare("9p", "ro-store", "virtio1"),
        VirtioShare("virtiofs", None, "virtio2"),
        VirtioShare("9p", None, "virtio3"),
        VirtioShare("virtiofs", None, "virtio10"),
    ]


def test_shares_6_12_virtiofs_tags_from_sys_fs(fs: Any) -> None:
    virtio_dev(fs, 0, 2, 26, "virtio_fs")
    virtio_dev(fs, 1, 3, 9, "9pnet_virtio", mount_tag=b"shared\x00")
    virtio_dev(fs, 2, 4, 26, "virtio_fs")
    # The kernel numbers /sys/fs/virtiofs/N by probe order, not by virtio index.
    tag36 = "t" * 36
    for n, (dev, slot, tag) in enumerate([("virtio2", 4, "home"), ("virtio0", 2, tag36)]):
        fs.create_file(f"/sys/fs/virtiofs/{n}/tag", contents=f"{tag}\n")
        fs.create_symlink(
            f"/sys/fs/virtiofs/{n}/device",
            f"../../../devices/pci0000:00/0000:00:{slot:02x}.0/{dev}",
        )
    assert virtiofs_tags_readable()
    assert scan_shares() == [
        VirtioShare("virtiofs", tag36, "virtio0"),
        VirtioShare("9p", "shared", "virtio1"),
        VirtioShare("virtiofs", "home", "virtio2"),
    ]


def test_virtiofs_device_unbound_on_6_12_has_no_tag(fs: Any) -> None:
    virtio_dev(fs, 0, 2, 26, None)
    fs.create_dir("/sys/fs/virtiofs")
    assert scan_shares() == [VirtioShare("virtiofs", None, "virtio0")]


def test_no_virtio_bus_and_junk_device_file(fs: Any) -> None:
    assert virtio_devices() == [] and scan_shares() == [] and scan_block_devices() == []
    fs.create_file("/sys/bus/virtio/devices/virtio0/device", contents="garbage")
    assert virtio_devices() == []


def test_alternate_sysfs_root(fs: Any) -> None:
    fs.create_file("/mnt/sys/bus/virtio/devices/virtio7/device", contents="0x001a\n")
    assert scan_shares("/mnt/sys") == [VirtioShare("virtiofs", None, "virtio7")]


@pytest.mark.parametrize(
    ("text", "want"),
    [("0x0009\n", 9), ("0x001a", 26), ("0x0002", 2), ("", None), ("zz", None), (None, None)],
)
def test_parse_virtio_id(text: str | None, want: int | None) -> None:
    assert parse_virtio_id(text) == want


@pytest.mark.parametrize(
    ("text", "want"),
    [("254:0\n", (254, 0)), ("7:16", (7, 16)), ("254", None), ("a:b", None), (None, None)],
)
def test_parse_devnum(text: str | None, want: tuple[int, int] | None) -> None:
    assert parse_devnum(text) == want


def test_devnum_of_a_device_node(tmp_path: Any) -> None:
    assert major_minor(os.makedev(259, 70000)) == (259, 70000)
    assert devnum("/dev/null") == (1, 3)  # fixed by the kernel (devices.txt)
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    assert devnum(str(link)) == (1, 3)  # links followed, as a mount source is
    assert devnum(str(tmp_path / "none")) is None
    assert devnum(str(tmp_path)) == (0, 0)  # not a device: st_rdev is 0


def block(
    fs: Any,
    devdir: str,
    name: str,
    devnum: str,
    sectors: int,
    ro: int = 0,
    serial: str | None = None,
    partition: int | None = None,
    devname: str | None = None,
) -> None:
    """A block device directory and its /sys/class/block (and /sys/block) links."""
    path = f"{devdir}/{name}"
    fs.create_file(f"{path}/dev", contents=f"{devnum}\n")
    fs.create_file(f"{path}/size", contents=f"{sectors}\n")
    fs.create_file(f"{path}/ro", contents=f"{ro}\n")
    major, minor = devnum.split(":")
    uevent = f"MAJOR={major}\nMINOR={minor}\nDEVNAME={devname or name}\n"
    fs.create_file(f"{path}/uevent", contents=uevent)
    if serial is not None:
        fs.create_file(f"{path}/serial", contents=serial)
    if partition is not None:
        fs.create_file(f"{path}/partition", contents=f"{partition}\n")
    else:
        fs.create_symlink(f"/sys/block/{name}", ".." + path[len("/sys") :])
    fs.create_symlink(f"/sys/class/block/{name}", "../.." + path[len("/sys") :])


@pytest.fixture
def disks(fs: Any) -> Any:
    vda = f"{PCI}/0000:00:02.0/virtio1/block"
    block(fs, vda, "vda", "254:0", 2 * 1024 * 1024, serial="rw-store")
    block(fs, f"{vda}/vda", "vda1", "254:1", 2048, partition=1)
    block(fs, f"{vda}/vda", "vda2", "254:2", 4096, partition=2)
    vdb = f"{PCI}/0000:00:03.0/virtio2/block"
    block(fs, vdb, "vdb", "254:16", 8192, ro=1, serial="")  # serial attr present, empty
    sda = f"{PCI}/0000:00:07.0/host0/target0:0:0/0:0:0:0/block"
    block(fs, sda, "sda", "8:0", 100)
    fs.create_file(f"{PCI}/0000:00:07.0/host0/target0:0:0/0:0:0:0/serial", contents="SCSI-01  \n")
    fs.create_symlink(f"{sda}/sda/device", "../..")
    virt = "/sys/devices/virtual/block"
    block(fs, virt, "loop0", "7:0", 0)  # unattached loop: skipped
    block(fs, virt, "loop1", "7:1", 20480)
    block(fs, virt, "ram0", "1:0", 8192)
    block(fs, virt, "zram0", "252:0", 8192)
    block(fs, virt, "cciss!c0d0", "104:0", 16, devname="cciss/c0d0")
    return fs


def test_block_devices(disks: Any) -> None:
    got = {d.name: d for d in scan_block_devices()}
    assert list(got) == ["cciss!c0d0", "loop1", "sda", "vda", "vda1", "vda2", "vdb"]
    assert got["vda"] == BlockDevice(
        "vda", "/dev/vda", (254, 0), "rw-store", True, False, 1 << 30, False, None
    )
    assert got["vda1"] == BlockDevice(
        "vda1", "/dev/vda1", (254, 1), None, True, True, 1 << 20, False, "vda"
    )
    assert got["vda2"].parent == "vda" and got["vda2"].size_bytes == 2 << 20
    assert got["vdb"].read_only and got["vdb"].serial is None and got["vdb"].virtio
    assert got["sda"].serial == "SCSI-01" and not got["sda"].virtio
    assert got["loop1"] == BlockDevice(
        "loop1", "/dev/loop1", (7, 1), None, False, False, 20480 * 512, False, None
    )
    assert got["cciss!c0d0"].devnode == "/dev/cciss/c0d0"


def test_block_device_with_unreadable_dev_is_skipped(disks: Any) -> None:
    fs = disks
    fs.remove_object(f"{PCI}/0000:00:02.0/virtio1/block/vda/vda2/dev")
    assert "vda2" not in {d.name for d in scan_block_devices()}


# --- transports ---------------------------------------------------------------------

MMIO = "/sys/devices/platform"


def test_virtio_transport_pci_mmio_and_unknown(fs: Any) -> None:
    """As qemu's q35 (virtio-pci) and microvm (virtio-mmio as ACPI LNRO0005 platform
    devices) machines lay them out; shares by their /sys/bus/virtio link, disks from below."""
    fs.create_dir("/sys/bus/pci")
    fs.create_dir("/sys/bus/platform")
    fs.create_dir("/sys/bus/ccw")
    virtio_dev(fs, 0, 2, 9, "9pnet_virtio", mount_tag=b"ro-store\x00")
    fs.create_symlink(f"{PCI}/0000:00:02.0/subsystem", "../../../bus/pci")
    for n, devid in ((1, 2), (2, 26)):
        path = f"{MMIO}/LNRO0005:0{n}/virtio{n}"
        fs.create_file(f"{path}/device", contents=f"0x{devid:04x}\n")
        fs.create_symlink(f"{MMIO}/LNRO0005:0{n}/subsystem", "../../../bus/platform")
        fs.create_symlink(f"/sys/bus/virtio/devices/virtio{n}", f"../../..{path[4:]}")
    block(fs, f"{MMIO}/LNRO0005:01/virtio1/block", "vda", "254:0", 8, serial="store")
    block(fs, f"{MMIO}/LNRO0005:01/virtio1/block/vda", "vda1", "254:1", 4, partition=1)
    css = "/sys/devices/css0/0.0.0000/0.0.0000"  # s390: virtio-ccw
    fs.create_dir(f"{css}/virtio3")
    fs.create_symlink(f"{css}/subsystem", "../../../bus/ccw")
    fs.create_dir(f"{PCI}/0000:00:05.0/virtio4")  # a parent without a subsystem link

    assert virtio_transport("/sys/bus/virtio/devices/virtio0") == "pci"
    assert virtio_transport("/sys/bus/virtio/devices/virtio1") == "mmio"
    assert virtio_transport("/sys/bus/virtio/devices/virtio2") == "mmio"
    assert virtio_transport("/sys/class/block/vda") == "mmio"
    assert virtio_transport("/sys/class/block/vda1") == "mmio"
    assert virtio_transport(f"{css}/virtio3") == "ccw"
    assert virtio_transport(f"{PCI}/0000:00:05.0/virtio4") is None
    assert virtio_transport("/sys/devices/virtual/block/loop0") is None
    assert virtio_transport("/sys/bus/virtio/devices/virtio9") is None  # no such device

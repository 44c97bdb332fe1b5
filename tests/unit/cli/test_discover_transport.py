"""`discover` names the transport of every share and disk (fake sysfs trees laid out as
qemu's q35 and microvm machines show them; the booted proof is tests/vm/test_mmio.py)."""

from __future__ import annotations

import json
import os
from typing import Any

from guest_agent.cli.discover import discover, discover_all, render

PCI = "/sys/devices/pci0000:00/0000:00:02.0"
MMIO = "/sys/devices/platform/LNRO0005:00"


def _virtio(fs: Any, parent: str, bus: str, n: int, devid: int, driver: str, **attrs: bytes) -> str:
    path = f"{parent}/virtio{n}"
    fs.create_file(f"{path}/device", contents=f"0x{devid:04x}\n")
    for name, value in attrs.items():
        fs.create_file(f"{path}/{name}", contents=value)
    os.makedirs(f"/sys/bus/virtio/drivers/{driver}", exist_ok=True)
    fs.create_symlink(f"{path}/driver", f"/sys/bus/virtio/drivers/{driver}")
    if not os.path.lexists(f"{parent}/subsystem"):
        fs.create_symlink(f"{parent}/subsystem", f"/sys/bus/{bus}")
    fs.create_symlink(f"/sys/bus/virtio/devices/virtio{n}", path)
    return path


def _disk(fs: Any, virtio: str, name: str, serial: str) -> None:
    path = f"{virtio}/block/{name}"
    fs.create_file(f"{path}/dev", contents="254:0\n")
    fs.create_file(f"{path}/size", contents="0\n")
    fs.create_file(f"{path}/ro", contents="1\n")
    fs.create_file(f"{path}/serial", contents=serial)
    fs.create_file(f"{path}/uevent", contents=f"DEVNAME={name}\n")
    fs.create_symlink(f"/sys/block/{name}", path)
    fs.create_symlink(f"/sys/class/block/{name}", path)


def _tree(fs: Any) -> None:
    fs.create_dir("/sys/bus/pci")
    fs.create_dir("/sys/bus/platform")
    _virtio(fs, PCI, "pci", 0, 9, "9pnet_virtio", mount_tag=b"ro-store\x00")
    blk = _virtio(fs, MMIO, "platform", 1, 2, "virtio_blk")
    _disk(fs, blk, "vda", "store")


def test_discover_names_each_transport(fs: Any, capsys: Any) -> None:
    _tree(fs)
    items, notes, problems = discover_all()
    assert notes == [] and problems == []
    assert [(type(i).__name__, i.transport) for i in items] == [
        ("ShareRow", "pci"),
        ("DiskRow", "mmio"),
    ]
    assert render(items).splitlines() == [
        "share  9p        ro-store                 virtio0   pci",
        "disk   /dev/vda     mmio serial=store label=- uuid=- fstype=- size=0",
    ]
    assert discover(as_json=True) == 0
    listed = json.loads(capsys.readouterr().out)["devices"]
    assert [(o["kind"], o["transport"]) for o in listed] == [("share", "pci"), ("disk", "mmio")]

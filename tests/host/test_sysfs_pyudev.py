"""scan_block_devices (plain sysfs) against pyudev (libudev) on a real partitioned loop device.

pyudev is the oracle here: it reads the same sysfs through libudev, which an
initrd may lack. Needs root (losetup) and libudev.so.1.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent.devices.sysfs import BlockDevice, scan_block_devices


def _pyudev() -> Any:
    try:
        import pyudev  # type: ignore[import-untyped]

        pyudev.Context()
    except ImportError as e:  # pyudev raises ImportError when libudev.so.1 cannot be loaded
        pytest.skip(f"pyudev/libudev unavailable ({e}); apt-get install -y libudev1")
    return pyudev


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: attaches loop devices"),
    pytest.mark.skipif(
        shutil.which("losetup") is None, reason="losetup (util-linux) not installed"
    ),
]

SECTOR = 512


def mbr_image(path: Path, size_mib: int, parts: list[tuple[int, int]]) -> None:
    """An image with a DOS partition table; parts are (start sector, sector count), type 0x83."""
    with path.open("wb") as f:
        f.truncate(size_mib << 20)
        table = b""
        for start, count in parts:
            table += struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, count)
        f.seek(446)
        f.write(table.ljust(64, b"\0") + b"\x55\xaa")


@pytest.fixture
def loop_dev(tmp_path: Path) -> Iterator[str]:
    img = tmp_path / "disk.img"
    mbr_image(img, 8, [(2048, 4096), (6144, 8192)])
    dev = subprocess.run(
        ["losetup", "-f", "-P", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        name = os.path.basename(dev)
        deadline = time.monotonic() + 1  # LOOP_CONFIGURE scans partitions synchronously
        while not os.path.exists(f"/sys/class/block/{name}p2") and time.monotonic() < deadline:
            time.sleep(0.05)
        yield name
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_agrees_with_pyudev(loop_dev: str) -> None:
    pyudev = _pyudev()
    ours = {d.name: d for d in scan_block_devices()}
    ctx = pyudev.Context()
    names = [loop_dev, f"{loop_dev}p1", f"{loop_dev}p2"]
    if f"{loop_dev}p1" not in ours:
        names = [loop_dev]  # kernel without DOS partition support: compare the disk only
    for name in names:
        dev = pyudev.Devices.from_name(ctx, "block", name)
        mine: BlockDevice = ours[name]
        assert mine.devnum == (os.major(dev.device_number), os.minor(dev.device_number)), name
        assert mine.size_bytes == dev.attributes.asint("size") * SECTOR, name
        assert mine.partition == (dev.device_type == "partition"), name
        assert mine.devnode == dev.device_node, name
        assert mine.read_only == bool(dev.attributes.asint("ro")), name
    assert ours[loop_dev].size_bytes == 8 << 20 and not ours[loop_dev].virtio
    if len(names) == 3:
        assert ours[f"{loop_dev}p1"].size_bytes == 4096 * SECTOR
        assert ours[f"{loop_dev}p2"].parent == loop_dev


def test_every_block_device_agrees_with_pyudev(loop_dev: str) -> None:
    """Across the whole machine (virtio disks included), not just our loop device."""
    pyudev = _pyudev()
    ctx = pyudev.Context()
    theirs = {d.sys_name: d for d in ctx.list_devices(subsystem="block")}
    ours = scan_block_devices()
    assert ours, "no block devices found"
    for mine in ours:
        dev = theirs[mine.name]
        assert mine.devnum == (os.major(dev.device_number), os.minor(dev.device_number))
        assert mine.size_bytes == dev.attributes.asint("size") * SECTOR
        assert mine.partition == (dev.device_type == "partition")
        parent = dev.find_parent("virtio") if hasattr(dev, "find_parent") else None
        assert mine.virtio == (parent is not None), mine.name
    skipped = {n for n in theirs if n.startswith(("ram", "zram"))}
    skipped |= {
        n for n, d in theirs.items() if n.startswith("loop") and d.attributes.asint("size") == 0
    }
    assert {d.name for d in ours} == set(theirs) - skipped

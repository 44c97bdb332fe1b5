"""`discover` says when it loads kernel modules (and `--no-load` loads none), and exits 1
with the reason when it could not read a disk (fake sysfs; the booted run is
tests/vm/test_mmio.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from guest_agent.cli import discover as discover_cmd
from guest_agent.cli.discover import discover
from guest_agent.kmod.loader import ModuleLoader

DISK = "/sys/devices/pci0000:00/0000:00:03.0/virtio1"


def _disk(fs: Any, size_sectors: int) -> None:
    fs.create_file(f"{DISK}/device", contents="0x0002\n")
    fs.create_dir("/sys/bus/virtio/drivers/virtio_blk")
    fs.create_symlink(f"{DISK}/driver", "/sys/bus/virtio/drivers/virtio_blk")
    fs.create_symlink("/sys/bus/virtio/devices/virtio1", DISK)
    blk = f"{DISK}/block/vda"
    fs.create_file(f"{blk}/dev", contents="254:0\n")
    fs.create_file(f"{blk}/size", contents=f"{size_sectors}\n")
    fs.create_file(f"{blk}/ro", contents="0\n")
    fs.create_file(f"{blk}/uevent", contents="DEVNAME=vda\n")
    fs.create_symlink("/sys/class/block/vda", blk)
    fs.create_dir("/sys/bus/pci/devices")


def _driverless(fs: Any) -> None:
    """A virtio device with no driver bound: its module is to be loaded."""
    dev = "/sys/devices/pci0000:00/0000:00:04.0/virtio2"
    fs.create_file(f"{dev}/modalias", contents="virtio:d00000009v00001AF4\n")
    fs.create_symlink("/sys/bus/virtio/devices/virtio2", dev)


def test_a_disk_it_cannot_read_is_exit_1_with_the_reason(
    fs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _disk(fs, size_sectors=8)  # no /dev/vda to read: as a non-root user's EACCES
    assert discover(load=False) == 1
    out, err = capsys.readouterr()
    assert "fstype=(unreadable)" in out
    (line,) = err.splitlines()
    assert line.startswith(
        "error: /dev/vda: cannot read it to find its filesystem: No such file or directory"
    )
    assert discover(as_json=True, load=False) == 1
    got = json.loads(capsys.readouterr().out)
    assert got["ok"] is False
    assert [(p["spec"], p["fatal"]) for p in got["problems"]] == [("/dev/vda", True)]


def test_a_disk_it_can_read_is_exit_0(fs: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _disk(fs, size_sectors=8)
    fs.create_file("/dev/vda", contents=b"\0" * 4096)
    assert discover(load=False) == 0
    out, err = capsys.readouterr()
    assert "fstype=- size=4096" in out and err == ""


def test_it_says_when_it_loads_modules(
    fs: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _disk(fs, size_sectors=0)
    _driverless(fs)
    asked: list[str] = []
    monkeypatch.setattr(ModuleLoader, "load_driver", lambda _self, alias: asked.append(alias))
    assert discover() == 0
    assert asked == ["virtio:d00000009v00001AF4"]
    assert capsys.readouterr().err.splitlines() == [
        "loaded the kernel modules of 1 driverless virtio device(s)"
        " (--no-load lists without loading)"
    ]


def test_no_load_loads_nothing(
    fs: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _disk(fs, size_sectors=0)
    _driverless(fs)
    monkeypatch.setattr(ModuleLoader, "load_driver", lambda *_: pytest.fail("loaded"))
    assert discover(load=False) == 0
    assert capsys.readouterr().err == ""


def test_a_driver_that_fails_to_load_is_a_warning(
    fs: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _disk(fs, size_sectors=0)
    _driverless(fs)
    monkeypatch.setattr(ModuleLoader, "load_driver", lambda *_: "9pnet_virtio: not found")
    assert discover(as_json=True) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "warning: guest-agent discover: cannot load a driver: 9pnet_virtio: not found"
    ]
    assert json.loads(out)["problems"][0]["fatal"] is False
    assert discover_cmd.SPEC == "guest-agent discover"

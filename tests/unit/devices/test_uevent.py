"""Uevent parsing (with pyroute2's parser as an oracle) and the netlink monitor."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_agent.devices import uevent
from guest_agent.devices.uevent import OVERFLOW, Uevent, UeventMonitor, parse_uevent

# Captured from a 6.x guest (virtio-pci 9p device, its driver binding, a virtio-blk disk).
VIRTIO_ADD = (
    b"add@/devices/pci0000:00/0000:00:04.0/virtio2\0ACTION=add\0"
    b"DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio2\0SUBSYSTEM=virtio\0"
    b"MODALIAS=virtio:d00000009v00001AF4\0SEQNUM=1207\0"
)
VIRTIO_BIND = (
    b"bind@/devices/pci0000:00/0000:00:04.0/virtio2\0ACTION=bind\0"
    b"DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio2\0SUBSYSTEM=virtio\0"
    b"DRIVER=9pnet_virtio\0MODALIAS=virtio:d00000009v00001AF4\0SEQNUM=1210\0"
)
BLOCK_ADD = (
    b"add@/devices/pci0000:00/0000:00:02.0/virtio1/block/vda\0ACTION=add\0"
    b"DEVPATH=/devices/pci0000:00/0000:00:02.0/virtio1/block/vda\0SUBSYSTEM=block\0"
    b"MAJOR=254\0MINOR=0\0DEVNAME=vda\0DEVTYPE=disk\0DISKSEQ=9\0SEQNUM=1188\0"
)
LOOP_CHANGE = (  # from this host: attaching a file to a pre-created loop device
    b"change@/devices/virtual/block/loop0\0ACTION=change\0DEVPATH=/devices/virtual/block/loop0"
    b"\0SUBSYSTEM=block\0DISK_MEDIA_CHANGE=1\0MAJOR=7\0MINOR=0\0DEVNAME=loop0\0DEVTYPE=disk"
    b"\0DISKSEQ=13\0SEQNUM=820\0"
)
CAPTURED = [VIRTIO_ADD, VIRTIO_BIND, BLOCK_ADD, LOOP_CHANGE]


def libudev_message(props: bytes) -> bytes:
    """udevd's re-broadcast format: "libudev\\0", magic 0xfeedcafe, offsets, bloom filters."""
    header = struct.Struct("!8sIIIIIIII")
    return header.pack(b"libudev", 0xFEEDCAFE, 40, 40, len(props), 0x1234, 0, 0, 0) + props


def test_parse_virtio_add() -> None:
    ev = parse_uevent(VIRTIO_ADD)
    assert ev is not None
    assert (ev.action, ev.devpath, ev.subsystem) == (
        "add",
        "/devices/pci0000:00/0000:00:04.0/virtio2",
        "virtio",
    )
    assert ev.env["MODALIAS"] == "virtio:d00000009v00001AF4"
    assert ev.env["SEQNUM"] == "1207"


def test_parse_bind_and_block_add() -> None:
    bind = parse_uevent(VIRTIO_BIND)
    assert bind is not None and bind.action == "bind" and bind.env["DRIVER"] == "9pnet_virtio"
    blk = parse_uevent(BLOCK_ADD)
    assert blk is not None and blk.subsystem == "block"
    assert (blk.env["DEVNAME"], blk.env["MAJOR"], blk.env["MINOR"]) == ("vda", "254", "0")


def test_libudev_format_is_ignored() -> None:
    props = b"ACTION=add\0DEVPATH=/devices/virtual/block/loop0\0SUBSYSTEM=block\0"
    assert parse_uevent(libudev_message(props)) is None


@pytest.mark.parametrize(
    "data",
    [b"", b"\0", b"garbage", b"add@\0", b"@/devices/x\0", b"add@relative\0", b"\xff@/x\0"],
)
def test_unparsable_headers_give_none(data: bytes) -> None:
    assert parse_uevent(data) is None


def test_bad_key_lines_are_dropped_not_raised() -> None:
    ev = parse_uevent(b"change@/devices/x\0NOEQUALS\0=novalue\0BAD=\xff\xfe\0EMPTY=\0A=b=c\0")
    assert ev is not None and dict(ev.env) == {"EMPTY": "", "A": "b=c"}
    assert ev.subsystem is None


def test_uevent_is_frozen() -> None:
    ev = parse_uevent(VIRTIO_ADD)
    assert ev is not None
    with pytest.raises(AttributeError):
        ev.action = "remove"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ev.env["ACTION"] = "remove"  # type: ignore[index]
    assert hash(ev) == hash(parse_uevent(VIRTIO_ADD))


# --- differential: pyroute2's own uevent marshal is the oracle (test-only import) ---


def pyroute2_parse(data: bytes) -> tuple[str, dict[str, str]]:
    from pyroute2.netlink.uevent import MarshalUevent  # type: ignore[import-untyped]

    (msg,) = list(MarshalUevent().parse(data))
    keys = {k: v for k, v in msg.items() if k not in ("header", "attrs")}
    return msg["header"]["message"], keys


def assert_agrees(data: bytes) -> None:
    ours = parse_uevent(data)
    assert ours is not None
    message, keys = pyroute2_parse(data)
    assert message == f"{ours.action}@{ours.devpath}"
    assert dict(ours.env) == keys
    assert keys.get("ACTION", ours.action) == ours.action
    assert keys.get("DEVPATH", ours.devpath) == ours.devpath


@pytest.mark.parametrize("data", CAPTURED)
def test_differential_captured(data: bytes) -> None:
    assert_agrees(data)


_word = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789_-:.,/"), max_size=20)
_key = st.text(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789"), min_size=1, max_size=12)
_value = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=30)


@given(
    action=st.sampled_from(["add", "remove", "change", "bind", "unbind", "move"]),
    devpath=_word.map(lambda w: "/devices/" + w),
    env=st.lists(st.tuples(_key, _value), max_size=12),
)
def test_differential_generated(action: str, devpath: str, env: list[tuple[str, str]]) -> None:
    body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env)
    assert_agrees(f"{action}@{devpath}".encode() + b"\0" + body)


# --- UeventMonitor without a kernel ---------------------------------------------


def test_monitor_degrades_to_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: Any, **_k: Any) -> socket.socket:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(uevent.socket, "socket", refuse)  # the C module the monitor uses
    with UeventMonitor() as mon:
        assert (
            not mon.available and mon.error is not None and "Operation not permitted" in mon.error
        )
        start = time.monotonic()
        assert mon.wait(5.0) is None
        assert mon.wait(0.0) is None
        assert time.monotonic() - start < 0.5  # slept at most 0.1 s, not the full timeout


class FakeNetlink:
    """Stands in for the netlink socket: a queue of (data, sender pid) or OSError."""

    def __init__(self, items: list[tuple[bytes, int] | OSError]) -> None:
        self.items = items

    def recvfrom(self, _size: int, _flags: int) -> tuple[bytes, tuple[int, int]]:
        item = self.items.pop(0)
        if isinstance(item, OSError):
            raise item
        return item[0], (item[1], 1)

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        pass


class FakePoll:
    def __init__(self, sock: FakeNetlink) -> None:
        self.sock = sock

    def poll(self, _ms: int) -> list[tuple[int, int]]:
        return [(99, 1)] if self.sock.items else []


def fake_monitor(items: list[tuple[bytes, int] | OSError]) -> UeventMonitor:
    mon = UeventMonitor()
    sock = FakeNetlink(items)
    mon._sock = sock  # type: ignore[assignment]
    mon._poll = FakePoll(sock)  # type: ignore[assignment]
    mon.available = True
    return mon


def test_wait_skips_udev_and_non_kernel_senders() -> None:
    mon = fake_monitor(
        [(libudev_message(b"ACTION=add\0"), 0), (VIRTIO_ADD, 4242), (b"junk", 0), (BLOCK_ADD, 0)]
    )
    ev = mon.wait(1.0)
    assert ev is not None and ev.env["DEVNAME"] == "vda"
    assert mon.wait(0.01) is None  # queue drained: timeout


def test_wait_reports_overflow_and_survives_other_errors() -> None:
    mon = fake_monitor([OSError(errno.ENOBUFS, "No buffer space available")])
    assert mon.wait(1.0) is OVERFLOW and OVERFLOW.action == "overflow"
    mon = fake_monitor([OSError(errno.EIO, "I/O error")])
    assert mon.wait(1.0) is None and not mon.available and mon.error is not None


# --- real kernel (root) ---------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates loop devices")
LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81


def wait_for(mon: UeventMonitor, name: str, actions: set[str], seconds: float) -> Uevent | None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ev = mon.wait(left)
        if ev and ev.env.get("DEVNAME") == name and ev.action in actions:
            return ev
    return None


@pytest.fixture
def loop_image(tmp_path: Path) -> Iterator[Path]:
    img = tmp_path / "loop.img"
    with img.open("wb") as f:
        f.truncate(1 << 20)
    yield img


@pytest.mark.root
@needs_root
@pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup (util-linux) not installed")
def test_monitor_sees_losetup(loop_image: Path) -> None:
    before = set(os.listdir("/sys/class/block"))
    with UeventMonitor() as mon:
        assert mon.available, mon.error
        dev = subprocess.run(
            ["losetup", "-f", "--show", str(loop_image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        try:
            name = os.path.basename(dev)
            # A pre-created /dev/loopN only changes (media attached); a new one is added.
            want = {"change"} if name in before else {"add"}
            ev = wait_for(mon, name, want, 5.0)
            assert ev is not None, f"no {want} uevent for {name} within 5 s"
            assert ev.subsystem == "block" and ev.devpath.endswith(f"/block/{name}")
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
@needs_root
@pytest.mark.skipif(not os.path.exists("/dev/loop-control"), reason="no /dev/loop-control")
def test_monitor_sees_new_loop_device_add(loop_image: Path) -> None:
    """A loop device created through /dev/loop-control always gives a real "add" uevent."""
    existing = set(os.listdir("/sys/class/block"))
    n = next(i for i in range(200, 10000) if f"loop{i}" not in existing)
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        with UeventMonitor() as mon:
            assert mon.available, mon.error
            assert fcntl.ioctl(ctl, LOOP_CTL_ADD, n) == n
            try:
                ev = wait_for(mon, f"loop{n}", {"add"}, 5.0)
                assert ev is not None, f"no add uevent for loop{n} within 5 s"
                assert ev.env["MAJOR"] == "7" and ev.subsystem == "block"
            finally:
                fcntl.ioctl(ctl, LOOP_CTL_REMOVE, n)
            assert wait_for(mon, f"loop{n}", {"remove"}, 5.0) is not None
    finally:
        os.close(ctl)

"""Devices: locating shares and disks, the discovery cache and waiting (sysfs and the prober
replaced by fakes; nothing is loaded or waited for)."""

from __future__ import annotations

import importlib
import io
from pathlib import Path

import pytest

from guest_agent.config.parsers import parse_share, parse_volume
from guest_agent.devices import probe, sysfs
from guest_agent.devices.discovery import Devices
from guest_agent.devices.probe import Signature
from guest_agent.devices.sysfs import BlockDevice, VirtioShare
from guest_agent.report import Reporter
from guest_agent.results import Failure
from guest_agent.spec import ShareSpec, VolumeSpec


class Scans:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shares: list[VirtioShare] = []
        self.disks: list[BlockDevice] = []
        self.readable = True
        self.signatures: dict[str, Signature | None] = {}
        self.calls = {"shares": 0, "disks": 0, "probe": 0}
        monkeypatch.setattr(sysfs, "scan_shares", self._scan_shares)
        monkeypatch.setattr(sysfs, "scan_block_devices", self._scan_disks)
        monkeypatch.setattr(sysfs, "virtiofs_tags_readable", lambda _sysfs: self.readable)
        monkeypatch.setattr(probe, "probe_device", self._probe)

    def _scan_shares(self, _sysfs: str) -> list[VirtioShare]:
        self.calls["shares"] += 1
        return list(self.shares)

    def _scan_disks(self, _sysfs: str) -> list[BlockDevice]:
        self.calls["disks"] += 1
        return list(self.disks)

    def _probe(self, devnode: str) -> Signature | None:
        self.calls["probe"] += 1
        found = self.signatures.get(devnode)
        if found is None and devnode.endswith("unreadable"):
            raise OSError(5, "Input/output error")
        return found


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> Scans:
    return Scans(monkeypatch)


def share(text: str) -> ShareSpec:
    spec = parse_share(text, text)
    assert isinstance(spec, ShareSpec)
    return spec


def volume(text: str) -> VolumeSpec:
    spec = parse_volume(text, text)
    assert isinstance(spec, VolumeSpec)
    return spec


def disk(name: str, devnode: str, serial: str | None = None, size: int = 1 << 30) -> BlockDevice:
    return BlockDevice(name, devnode, (253, 0), serial, True, False, size, False)


def test_locate_share_by_transport(scans: Scans) -> None:
    scans.shares = [
        VirtioShare("9p", "store", "virtio0"),
        VirtioShare("virtiofs", "home", "virtio1"),
    ]
    devices = Devices()
    assert devices.locate_share(share("store:/s")) == ("9p", False)
    assert devices.locate_share(share("home:/h")) == ("virtiofs", False)
    assert devices.locate_share(share("home:/h:9p")) == (None, False)
    assert devices.locate_share(share("gone:/g")) == (None, False)
    assert scans.calls["shares"] == 1  # cached until something changes
    devices.forget()
    devices.locate_share(share("store:/s"))
    assert scans.calls["shares"] == 2


def test_blind_virtiofs_on_a_kernel_that_hides_tags(scans: Scans) -> None:
    scans.shares = [VirtioShare("virtiofs", None, "virtio1")]
    scans.readable = False
    devices = Devices()
    assert devices.locate_share(share("home:/h")) == ("virtiofs", True)
    assert devices.locate_share(share("home:/h:9p")) == (None, False)
    assert devices.shares_seen() == ["virtiofs (tag not readable on this kernel)"]


def test_find_disk_by_label_uuid_serial_and_path(scans: Scans, tmp_path: Path) -> None:
    a, b = tmp_path / "vda", tmp_path / "vdb"
    a.touch()
    b.touch()
    scans.disks = [disk("vda", str(a), "s-a"), disk("vdb", str(b), None)]
    scans.signatures = {
        str(a): Signature("ext4", "data", "ABCD-1234", "filesystem"),
        str(b): Signature("xfs", "other", None, "filesystem"),
    }
    devices = Devices()
    assert devices.find_disk(volume("LABEL=data:/d")) == str(a)
    assert devices.find_disk(volume("UUID=abcd-1234:/d")) == str(a)  # UUIDs ignore case
    assert devices.find_disk(volume("SERIAL=s-a:/d")) == str(a)
    assert devices.find_disk(volume("LABEL=none:/d")) is None
    assert devices.find_disk(volume("/dev/disk/by-label/other:/d")) == str(b)
    assert scans.calls["probe"] == 2  # each superblock read once
    assert devices.find_disk(volume("/dev/does-not-exist:/d")) is None


def test_a_partition_tables_id_is_no_uuid(scans: Scans, tmp_path: Path) -> None:
    """blkid reports a GPT/DOS disk id as PTUUID, never as UUID (udev makes no by-uuid link
    for it): UUID= must not find the whole disk of a partition table."""
    from guest_agent.devices.probe_filesystems import PARTITION_TABLE

    a = tmp_path / "vda"
    a.touch()
    scans.disks = [disk("vda", str(a))]
    scans.signatures = {str(a): Signature("gpt", None, "0f1e2d3c-aaaa", PARTITION_TABLE)}
    assert Devices().find_disk(volume("UUID=0f1e2d3c-aaaa:/d")) is None


def test_find_disk_refuses_to_guess(scans: Scans, tmp_path: Path) -> None:
    a, b = tmp_path / "vda", tmp_path / "vdb"
    a.touch()
    b.touch()
    scans.disks = [disk("vda", str(a)), disk("vdb", str(b))]
    scans.signatures = {str(p): Signature("ext4", "twin", None, "filesystem") for p in (a, b)}
    with pytest.raises(
        Failure, match=f"^LABEL=twin matches several disks \\({a}, {b}\\); refusing to guess$"
    ):
        Devices().find_disk(volume("LABEL=twin:/d"))


def test_disks_seen_for_a_timeout(scans: Scans) -> None:
    scans.disks = [
        disk("vda", "/dev/vda", "s1"),
        disk("vdb", "/dev/unreadable"),
        disk("vdc", "/dev/vdc", size=0),
        disk("vdd", "/dev/vdd"),
    ]
    scans.signatures = {"/dev/vda": Signature("ext4", "data", None, "filesystem")}
    assert Devices().disks_seen() == [
        "vda serial s1 ext4 label data",
        "vdb (cannot be read: Input/output error)",
        "vdc",
        "vdd with no filesystem signature",
    ]


def test_wait_looks_again_only_while_events_come(
    scans: Scans, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = Devices()
    coldplugs: list[int] = []

    def coldplug() -> None:  # no uevent socket, no driver loading here
        coldplugs.append(1)
        devices._coldplugged = True

    monkeypatch.setattr(devices, "coldplug", coldplug)
    looks: list[int] = []

    def look() -> str | None:
        looks.append(1)
        return None

    assert devices.wait(lambda: "found", devices.start + 10) == "found"
    assert coldplugs == []  # found at once: no coldplug
    assert devices.wait(look, devices.start - 1) is None  # past the deadline:
    assert looks == [1, 1] and coldplugs == [1]  # a look, the coldplug, one more look
    assert devices.wait(look, devices.start - 1) is None
    assert looks == [1, 1, 1] and coldplugs == [1]  # coldplugged once only


class Loader:
    """ModuleLoader's side the preload uses: what it was asked, in order."""

    def __init__(self) -> None:
        self.preloads: list[tuple[list[str], int]] = []

    def filesystem_modules(self, fstype: str) -> list[str]:
        return [f"{fstype}-module"]

    def preload(self, names: list[str], workers: int, use_blacklist: bool = False) -> None:
        assert use_blacklist  # coldplug's modaliases: the blacklist applies
        self.preloads.append((list(names), workers))


@pytest.mark.parametrize("cpus", [1, 2])
def test_preload_adds_the_named_filesystems_the_kernel_lacks_once(
    monkeypatch: pytest.MonkeyPatch, cpus: int
) -> None:
    from guest_agent.devices import discovery as devices_module

    monkeypatch.setattr(devices_module, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(devices_module, "registered_filesystems", lambda: frozenset({"ext4"}))
    devices = Devices()
    loader = Loader()
    devices._modules = loader  # type: ignore[assignment]
    devices.named_filesystems.update({"ext4", "9p", "overlay"})
    devices._preload(["virtio:d00000009v00001AF4"])
    devices._preload(["virtio:d00000002v00001AF4"])
    devices._preload([])  # as need_filesystem calls it
    if cpus == 1:
        assert loader.preloads == []  # nothing to overlap a load with
    else:
        assert loader.preloads == [
            (["virtio:d00000009v00001AF4", "9p-module", "overlay-module"], 2),
            (["virtio:d00000002v00001AF4"], 2),
        ]


class CmdlineMmioLoader(Loader):
    def __init__(self, order: list[str]) -> None:
        super().__init__()
        self.order = order

    def load_cmdline_mmio(self) -> list[str]:
        self.order.append("mmio")
        return ["cannot load module virtio_mmio: why"]


@pytest.mark.parametrize("cmdline", ["virtio_mmio.device=4K@0xd0000000:5 ro", "ro quiet"])
def test_coldplug_loads_virtio_mmio_first_for_devices_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cmdline: str
) -> None:
    """firecracker's devices exist only once virtio_mmio is loaded with its words: the
    boot path's coldplug asks the loader for it before scanning for driverless devices."""
    from guest_agent.devices import discovery as devices_module

    # from sys.modules, as the code imports them: pyfakefs (test_kmod's `fs`) drops the
    # modules first imported under it from sys.modules, not from the package's attributes
    coldplug = importlib.import_module("guest_agent.kmod.coldplug")
    uevent = importlib.import_module("guest_agent.devices.uevent")

    (tmp_path / "cmdline").write_text(cmdline)
    real = devices_module.cmdline_has_mmio_devices
    monkeypatch.setattr(devices_module, "cmdline_has_mmio_devices", lambda: real(str(tmp_path)))
    order: list[str] = []

    class Monitor:
        def open(self) -> Monitor:
            return self

        def close(self) -> None: ...

    monkeypatch.setattr(uevent, "UeventMonitor", Monitor)
    monkeypatch.setattr(
        coldplug,
        "coldplug_virtio",
        lambda *_a: order.append("scan") or [],  # type: ignore[func-returns-value]
    )
    stream = io.StringIO()
    devices = Devices(Reporter(stream, kmsg=None))
    loader = CmdlineMmioLoader(order)
    devices._modules = loader  # type: ignore[assignment]
    devices.coldplug()
    if "mmio.device=" in cmdline:
        assert order == ["mmio", "scan"]
        assert "warning: cannot load module virtio_mmio: why" in stream.getvalue()
    else:
        assert order == ["scan"] and stream.getvalue() == ""

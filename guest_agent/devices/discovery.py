"""Finding devices, and waiting for them: the uevent monitor, driver loading, discovery.

Find first, then mount: handlers ask `Devices` for a share's transport or a
disk's device node and mount it themselves. The first time a look finds nothing,
`coldplug()` opens the uevent socket and loads the drivers of the virtio devices
present, and the look is made again: register before the check that decides to
wait, as Kata's agent does, so no device can appear unnoticed in between. A warm
boot, whose devices are all there, never opens the socket. What
discovery saw (sysfs scans, superblocks) is kept until something may have
changed it: a uevent, a wait, a module load, a format (`forget`).

The module loader (guest_agent.kmod.loader and its index) is made only when something
has to be loaded: a warm boot, whose drivers and filesystems are all there,
never imports it (see docs/benchmarks.md).
"""

from __future__ import annotations

import os
import time

from guest_agent.kernel.mountinfo import registered_filesystems
from guest_agent.results import Failure
from guest_agent.spec import Proto

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from guest_agent.devices.probe import Signature
    from guest_agent.devices.sysfs import BlockDevice, VirtioShare
    from guest_agent.devices.uevent import UeventMonitor
    from guest_agent.kmod.loader import ModuleLoader
    from guest_agent.report import Reporter
    from guest_agent.spec import Options, ShareSpec, VolumeSpec

    T = TypeVar("T")


def cmdline_has_mmio_devices(proc: str = "/proc") -> bool:
    """Whether the kernel command line may describe virtio-mmio devices (firecracker's
    `virtio_mmio.device=` words; guest_agent.kmod.loader decides)."""
    try:
        with open(os.path.join(proc, "cmdline"), errors="replace") as f:
            return "mmio.device=" in f.read()
    except OSError:
        return False


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return 1


class _Seen:
    """What discovery saw since the last `forget`."""

    __slots__ = ("disks", "filesystems", "probes", "shares", "virtiofs_readable")

    def __init__(self) -> None:
        self.shares: list[VirtioShare] | None = None
        self.virtiofs_readable: bool | None = None
        self.disks: list[BlockDevice] | None = None
        self.probes: dict[str, Signature | None] = {}  # devnode -> superblock
        self.filesystems: set[str] = set()  # fstypes made sure of


class Devices:
    def __init__(self, reporter: Reporter | None = None, *, sysfs: str = "/sys") -> None:
        self.sysfs = sysfs
        self.reporter = reporter
        self.start = time.monotonic()  # device deadlines count from here
        self._modules: ModuleLoader | None = None
        self._monitor: UeventMonitor | None = None
        self._coldplugged = False
        self._seen = _Seen()
        self.named_filesystems: set[str] = set()  # what the plan mounts, as far as it says
        self._filesystems_preloaded = False

    def __enter__(self) -> Devices:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    # -- drivers and events -----------------------------------------------------------

    def modules(self) -> ModuleLoader:
        if self._modules is None:
            from guest_agent.kmod.loader import ModuleLoader

            self._modules = ModuleLoader(sysfs=self.sysfs)
        return self._modules

    def coldplug(self) -> None:
        """Once: watch uevents (before looking, so none is missed), then load virtio drivers."""
        if self._coldplugged:
            return
        self._coldplugged = True
        self.forget()
        from guest_agent.devices.uevent import UeventMonitor

        self._monitor = UeventMonitor().open()
        from guest_agent.kmod.coldplug import coldplug_virtio

        # As ModuleLoader.coldplug_virtio, but the loader is made only when something is to
        # be loaded: mmio devices on the command line, or a driverless device.
        errors = self.modules().load_cmdline_mmio() if cmdline_has_mmio_devices() else []
        for error in errors + coldplug_virtio(self._load, self.sysfs, self._preload):
            if self.reporter is not None:
                self.reporter.info(f"warning: {error}")

    def _load(self, alias: str) -> str | None:
        return self.modules().load_driver(alias)

    def _preload(self, aliases: list[str]) -> None:
        """On a guest with more than one CPU, load what ALIASES need in parallel, and the
        first time also the modules of the named filesystems the kernel lacks: a cold
        boot's module loads are most of its time (bench/analysis.md). Loading them one by
        one (`_load`, `need_filesystem`) follows, finds them in and reports failures."""
        workers = usable_cpus()
        if workers < 2:
            return
        names = list(aliases)
        if not self._filesystems_preloaded:
            self._filesystems_preloaded = True
            missing = self.named_filesystems - registered_filesystems()
            for fstype in sorted(missing):
                names += self.modules().filesystem_modules(fstype)
        if names:  # the aliases are modaliases: the blacklist applies to them
            self.modules().preload(names, workers, use_blacklist=True)

    def need_filesystem(self, fstype: str) -> None:
        """Make sure the kernel supports FSTYPE (loading its module); Failure if it cannot."""
        if fstype in self._seen.filesystems:
            return
        if fstype in registered_filesystems():
            self._seen.filesystems.add(fstype)  # nothing loaded: nothing seen has changed
            return
        self._preload([])
        error = self.modules().ensure_filesystem(fstype)
        self.forget()  # a module load can add devices (and virtiofs tags)
        self._seen.filesystems.add(fstype)
        if error:
            raise Failure(f"the kernel does not support {fstype}: {error}")

    def forget(self) -> None:
        """Something may have changed: look again next time."""
        self._seen = _Seen()

    def deadline(self, options: Options) -> float:
        return self.start + options.device_timeout

    def wait_event(self, deadline: float) -> bool:
        """Wait for the next uevent until DEADLINE; load drivers for added devices.

        False once the deadline has passed.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self._monitor is None:
            return False
        self.forget()
        event = self._monitor.wait(min(remaining, 3600.0))  # no limit (inf): wake up hourly
        if event is not None and event.action == "add" and "MODALIAS" in event.env:
            self.modules().load_driver(event.env["MODALIAS"])
        return time.monotonic() < deadline

    def look(self, look: Callable[[], T | None]) -> T | None:
        """LOOK now; when it finds nothing, coldplug (the first time) and LOOK again."""
        found = look()
        if found is None and not self._coldplugged:
            self.coldplug()
            found = look()
        return found

    def wait(self, look: Callable[[], T | None], deadline: float) -> T | None:
        """LOOK until it finds something, waiting for a uevent between looks (after a
        coldplug, the first time); None at DEADLINE."""
        while True:
            found = self.look(look)
            if found is not None:
                return found
            if not self.wait_event(deadline):
                return None

    # -- shares -----------------------------------------------------------------------

    def shares(self) -> list[VirtioShare]:
        if self._seen.shares is None:
            from guest_agent.devices.sysfs import scan_shares

            self._seen.shares = scan_shares(self.sysfs)
        return self._seen.shares

    def virtiofs_tags_readable(self) -> bool:
        if self._seen.virtiofs_readable is None:
            from guest_agent.devices.sysfs import virtiofs_tags_readable

            self._seen.virtiofs_readable = virtiofs_tags_readable(self.sysfs)
        return self._seen.virtiofs_readable

    def locate_share(self, spec: ShareSpec) -> tuple[str | None, bool]:
        """Which transport carries SPEC's tag: (proto or None, whether it is a blind try)."""
        shares = self.shares()
        for proto in (Proto.NINEP, Proto.VIRTIOFS):
            if spec.proto in (Proto.AUTO, proto) and any(
                s.proto == proto and s.tag == spec.tag for s in shares
            ):
                return str(proto), False
        readable = self.virtiofs_tags_readable()
        if spec.proto in (Proto.AUTO, Proto.VIRTIOFS) and not readable:
            if any(s.proto == Proto.VIRTIOFS and s.tag is None for s in shares):
                return Proto.VIRTIOFS, True
        return None, False

    def shares_seen(self) -> list[str]:
        """The virtio shares there now, for a timeout message."""
        from guest_agent.devices.sysfs import describe_shares

        return describe_shares(self.sysfs)

    # -- disks ------------------------------------------------------------------------

    def disks(self) -> list[BlockDevice]:
        if self._seen.disks is None:
            from guest_agent.devices.sysfs import scan_block_devices

            self._seen.disks = scan_block_devices(self.sysfs)
        return self._seen.disks

    def probe(self, devnode: str) -> Signature | None:
        """DEVNODE's superblock (None when it has none, or cannot be read)."""
        probes = self._seen.probes
        if devnode not in probes:
            from guest_agent.devices.probe import probe_device

            try:
                probes[devnode] = probe_device(devnode)
            except OSError:
                probes[devnode] = None
        return probes[devnode]

    def find_disk(self, spec: VolumeSpec) -> str | None:
        """SPEC's device node, None while it is not there; Failure when several disks match."""
        kind, value = spec.by
        if kind == "path":
            return value if os.path.exists(value) else None
        matches: list[BlockDevice] = []
        for dev in self.disks():
            if kind == "serial":
                if dev.serial == value and not dev.partition:
                    matches.append(dev)
                continue
            if dev.size_bytes == 0:
                continue
            signature = self.probe(dev.devnode)
            from guest_agent.devices.probe_filesystems import (
                PARTITION_TABLE,  # imported by the prober
            )

            if signature is None or signature.usage == PARTITION_TABLE:
                continue  # a partition table's id is blkid's PTUUID, no LABEL=/UUID=: as udev
            found = signature.label if kind == "label" else signature.uuid
            if found is not None and (
                found == value if kind == "label" else found.lower() == value.lower()
            ):
                matches.append(dev)
        if len(matches) > 1:
            names = ", ".join(d.devnode for d in matches)
            raise Failure(f"{spec.what} matches several disks ({names}); refusing to guess")
        if not matches or not os.path.exists(matches[0].devnode):
            return None
        return matches[0].devnode

    def disks_seen(self) -> list[str]:
        """The virtio disks there now and what they hold, for a timeout message."""
        from guest_agent.devices.probe import describe_disks

        return describe_disks(self.sysfs)

"""`guest-agent discover`: the virtio shares and disks this guest sees, and over which
transport (virtio-pci or virtio-mmio) each one came."""

from __future__ import annotations

import os
import sys
from typing import Any

from guest_agent.cli import json_output, print_json, write
from guest_agent.records import NamedTuple
from guest_agent.spec import Problem

# docs/reference.md "Commands" and "JSON output" show these (test_reference_outputs.py).
EXIT_CODES = {
    0: "every share and disk was listed",
    1: "a disk could not be read to find its filesystem (e.g. not run as root)",
}
JSON_LIST = "devices"
DEVICE_FIELDS = (
    "kind", "name", "source", "fstype", "transport",
    "serial", "label", "uuid", "size", "read_only", "partition",
)  # fmt: skip
SPEC = "guest-agent discover"  # the `spec` of its problems that concern no one device


def discover(as_json: bool = False, all_disks: bool = False, load: bool = True) -> int:
    """List virtio shares and disks, each with its transport ("pci", "mmio"); LOAD the
    drivers of driverless virtio devices first, as mount-all does."""
    from guest_agent.report import Reporter, printable

    reporter = Reporter(kmsg=None)
    items, notes, problems = discover_all(all_disks=all_disks, load=load)
    for note in notes:
        sys.stderr.write(printable(f"{note}\n"))
    for problem in problems:
        reporter.problem(problem)
    if as_json:
        print_json(
            json_output(not reporter.failed, JSON_LIST, [i.as_json() for i in items], problems)
        )
    else:
        write(render(items) + "\n")
    reporter.close()
    return 1 if reporter.failed else 0


class ShareRow(NamedTuple):
    name: str  # the virtio device: "virtio0"
    tag: str | None  # None when this kernel does not show virtiofs tags
    proto: str
    transport: str | None = None  # "pci", "mmio" (sysfs.virtio_transport); None: unknown

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": "share",
            "name": self.name,
            "source": self.tag,  # what mount-all mounts: the tag
            "fstype": self.proto,
            "transport": self.transport,
            "serial": None,
            "label": None,
            "uuid": None,
            "size": None,
            "read_only": None,
            "partition": None,
        }

    def line(self) -> str:
        tag = self.tag if self.tag is not None else "(tag not readable)"
        return f"share  {self.proto:<9} {tag:<24} {self.name:<9} {self.transport or '-'}"


class DiskRow(NamedTuple):
    name: str  # "vda"
    devnode: str  # "/dev/vda"
    serial: str | None
    label: str | None
    uuid: str | None
    fstype: str | None
    size: int
    read_only: bool
    partition: bool
    transport: str | None = None  # "pci", "mmio" for a virtio disk; None otherwise
    readable: bool = True  # False: probing it failed (a problem says why)

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": "disk",
            "name": self.name,
            "source": self.devnode,  # what mount-all mounts: the device node
            "fstype": self.fstype,
            "transport": self.transport,
            "serial": self.serial,
            "label": self.label,
            "uuid": self.uuid,
            "size": self.size,
            "read_only": self.read_only,
            "partition": self.partition,
        }

    def line(self) -> str:
        fstype = self.fstype or ("-" if self.readable else "(unreadable)")
        return (
            f"disk   {self.devnode:<12} {self.transport or '-':<4} serial={self.serial or '-'}"
            f" label={self.label or '-'}"
            f" uuid={self.uuid or '-'} fstype={fstype} size={self.size}"
        )


def discover_all(
    *, all_disks: bool = False, sysfs: str = "/sys", load: bool = True
) -> tuple[list[ShareRow | DiskRow], list[str], list[Problem]]:
    """Every virtio share and disk (after LOADing the virtio drivers, as mount-all does),
    with lines for stderr and the problems (a disk that cannot be read is fatal)."""
    from guest_agent.devices.probe import probe_device
    from guest_agent.devices.sysfs import (
        scan_block_devices,
        scan_shares,
        virtio_transport,
        virtiofs_tags_readable,
    )

    notes: list[str] = []
    problems = _load_drivers(sysfs, notes) if load else []
    items: list[ShareRow | DiskRow] = []
    shares = scan_shares(sysfs)
    for share in shares:
        path = os.path.join(sysfs, "bus/virtio/devices", share.device)
        items.append(ShareRow(share.device, share.tag, share.proto, virtio_transport(path)))
    if any(s.tag is None for s in shares) and not virtiofs_tags_readable(sysfs):
        notes.append(
            "note: this kernel (before 6.9) does not show virtiofs tags to userspace; "
            "mount-all tries a tag that no 9p device carries as virtiofs"
        )
    for dev in scan_block_devices(sysfs):
        if not (dev.virtio or all_disks):
            continue
        readable = True
        try:
            sig = probe_device(dev.devnode) if dev.size_bytes else None
        except OSError as e:
            sig, readable = None, False
            problems.append(
                Problem(
                    dev.devnode,
                    f"cannot read it to find its filesystem: {e.strerror}",
                    "run as root" if os.geteuid() != 0 else None,
                )
            )
        items.append(
            DiskRow(
                dev.name,
                dev.devnode,
                dev.serial,
                sig.label if sig else None,
                sig.uuid if sig else None,
                sig.fstype if sig else None,
                dev.size_bytes,
                dev.read_only,
                dev.partition,
                virtio_transport(os.path.join(sysfs, "class/block", dev.name))
                if dev.virtio
                else None,
                readable,
            )
        )
    return items, notes, problems


def _load_drivers(sysfs: str, notes: list[str]) -> list[Problem]:
    """Load the drivers of driverless virtio devices (as mount-all does), saying so in one
    line when it loads any; a driver that fails to load is a warning."""
    from guest_agent.kmod.coldplug import coldplug_virtio
    from guest_agent.kmod.loader import ModuleLoader

    loader = ModuleLoader(sysfs=sysfs)
    loaded: list[str] = []

    def load(modalias: str) -> str | None:
        error = loader.load_driver(modalias)
        if error is None:
            loaded.append(modalias)
        return error

    mmio = os.path.join(sysfs, "module", "virtio_mmio")
    had_mmio = os.path.isdir(mmio)
    errors = loader.load_cmdline_mmio()
    if not had_mmio and not errors and os.path.isdir(mmio):
        loaded.append("virtio_mmio")
    errors += coldplug_virtio(load, sysfs)
    if loaded:
        notes.append(
            f"loaded the kernel modules of {len(loaded)} driverless virtio device(s)"
            " (--no-load lists without loading)"
        )
    return [Problem(SPEC, f"cannot load a driver: {e}", fatal=False) for e in errors]


def render(items: list[ShareRow | DiskRow]) -> str:
    lines = [item.line() for item in items]
    return "\n".join(lines) if lines else "no virtio shares or disks found"

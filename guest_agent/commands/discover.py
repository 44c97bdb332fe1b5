"""`guest-agent discover`: the virtio shares and disks this guest sees, and over which
transport (virtio-pci or virtio-mmio) each one came."""

from __future__ import annotations

import os
import sys
from typing import Any

from guest_agent.commands import print_json, write
from guest_agent.records import NamedTuple


def discover(as_json: bool = False, all_disks: bool = False) -> int:
    """List virtio shares (tag, protocol) and disks (serial, label, fstype), each with its
    transport ("pci", "mmio")."""
    from guest_agent.report import printable

    items, notes = discover_all(all_disks=all_disks)
    if as_json:
        print_json([item.as_json() for item in items])
    else:
        write(render(items) + "\n")
    for note in notes:
        sys.stderr.write(printable(f"note: {note}\n"))
    return 0


class ShareRow(NamedTuple):
    tag: str | None  # None when this kernel does not show virtiofs tags
    proto: str
    device: str
    transport: str | None = None  # "pci", "mmio" (sysfs.virtio_transport); None: unknown

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": "share",
            "tag": self.tag,
            "proto": self.proto,
            "device": self.device,
            "transport": self.transport,
        }

    def line(self) -> str:
        tag = self.tag if self.tag is not None else "(tag not readable)"
        return f"share  {self.proto:<9} {tag:<24} {self.device:<9} {self.transport or '-'}"


class DiskRow(NamedTuple):
    name: str
    dev: str
    serial: str | None
    label: str | None
    uuid: str | None
    fstype: str | None
    size: int
    read_only: bool
    partition: bool
    transport: str | None = None  # "pci", "mmio" for a virtio disk; None otherwise

    def as_json(self) -> dict[str, Any]:
        return {"kind": "disk", "tag": None, "proto": None, **self._asdict()}

    def line(self) -> str:
        return (
            f"disk   {self.dev:<12} {self.transport or '-':<4} serial={self.serial or '-'}"
            f" label={self.label or '-'}"
            f" uuid={self.uuid or '-'} fstype={self.fstype or '-'} size={self.size}"
        )


def discover_all(
    *, all_disks: bool = False, sysfs: str = "/sys"
) -> tuple[list[ShareRow | DiskRow], list[str]]:
    """Every virtio share and disk (loading the virtio drivers first, as mount-all does)."""
    from guest_agent.kmod import ModuleLoader
    from guest_agent.probe import probe_device
    from guest_agent.sysfs import (
        scan_block_devices,
        scan_shares,
        virtio_transport,
        virtiofs_tags_readable,
    )

    notes = list(ModuleLoader(sysfs=sysfs).coldplug_virtio())
    items: list[ShareRow | DiskRow] = []
    shares = scan_shares(sysfs)
    for share in shares:
        path = os.path.join(sysfs, "bus/virtio/devices", share.device)
        items.append(ShareRow(share.tag, share.proto, share.device, virtio_transport(path)))
    if any(s.tag is None for s in shares) and not virtiofs_tags_readable(sysfs):
        notes.append(
            "this kernel (before 6.9) does not show virtiofs tags to userspace; "
            "mount-all tries a tag that no 9p device carries as virtiofs"
        )
    for dev in scan_block_devices(sysfs):
        if not (dev.virtio or all_disks):
            continue
        try:
            sig = probe_device(dev.devnode) if dev.size_bytes else None
        except OSError as e:
            sig = None
            notes.append(f"{dev.devnode}: cannot read: {e.strerror}")
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
            )
        )
    return items, notes


def render(items: list[ShareRow | DiskRow]) -> str:
    lines = [item.line() for item in items]
    return "\n".join(lines) if lines else "no virtio shares or disks found"

"""`guest-agent discover`: the virtio shares and disks this guest sees."""

from __future__ import annotations

import sys
from typing import Any

from guest_agent.commands import print_json, write


def discover(as_json: bool = False, all_disks: bool = False) -> int:
    """List virtio shares (tag, protocol) and disks (serial, label, fstype)."""
    from guest_agent.report import printable

    items, notes = discover_all(all_disks=all_disks)
    if as_json:
        print_json(items)
    else:
        write(render(items) + "\n")
    for note in notes:
        sys.stderr.write(printable(f"note: {note}\n"))
    return 0


def discover_all(
    *, all_disks: bool = False, sysfs: str = "/sys"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every virtio share and disk (loading the virtio drivers first, as mount-all does)."""
    from guest_agent.kmod import ModuleLoader
    from guest_agent.probe import probe_device
    from guest_agent.sysfs import scan_block_devices, scan_shares, virtiofs_tags_readable

    notes = list(ModuleLoader(sysfs=sysfs).coldplug_virtio())
    items: list[dict[str, Any]] = []
    shares = scan_shares(sysfs)
    for share in shares:
        items.append(
            {"kind": "share", "tag": share.tag, "proto": share.proto, "device": share.device}
        )
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
            {
                "kind": "disk",
                "tag": None,
                "proto": None,
                "name": dev.name,
                "dev": dev.devnode,
                "serial": dev.serial,
                "label": sig.label if sig else None,
                "uuid": sig.uuid if sig else None,
                "fstype": sig.fstype if sig else None,
                "size": dev.size_bytes,
                "read_only": dev.read_only,
                "partition": dev.partition,
            }
        )
    return items, notes


def render(items: list[dict[str, Any]]) -> str:
    lines = []
    for item in items:
        if item["kind"] == "share":
            tag = item["tag"] if item["tag"] is not None else "(tag not readable)"
            lines.append(f"share  {item['proto']:<9} {tag:<24} {item['device']}")
        else:
            lines.append(
                f"disk   {item['dev']:<12} serial={item['serial'] or '-'} label={item['label'] or '-'}"
                f" uuid={item['uuid'] or '-'} fstype={item['fstype'] or '-'} size={item['size']}"
            )
    return "\n".join(lines) if lines else "no virtio shares or disks found"

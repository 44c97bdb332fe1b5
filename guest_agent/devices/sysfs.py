"""Discovery of virtio shares and block devices from plain sysfs reads.

No udev, no libudev: everything here is a read of a sysfs file, so it works in
a bare initrd and is testable against fake trees. Nothing here raises for a
missing or unreadable attribute; the value is simply absent (None / skipped).
"""

from __future__ import annotations

import os

from guest_agent.records import NamedTuple

VIRTIO_ID_9P = 9
VIRTIO_ID_FS = 26


class VirtioShare(NamedTuple):
    proto: str  # "9p" | "virtiofs"
    tag: str | None  # None when the kernel does not expose it (virtiofs before 6.9)
    device: str  # "virtio3"


class BlockDevice(NamedTuple):
    name: str  # "vda", "vda1", "loop0"
    devnode: str  # "/dev/vda"
    devnum: tuple[int, int]
    serial: str | None  # whole disks only; the serial names the disk, not a partition
    virtio: bool
    partition: bool
    size_bytes: int
    read_only: bool
    parent: str | None = None  # the disk holding a partition ("vda" for "vda1")


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.decode("utf-8", "replace")


def _clean(text: str | None) -> str | None:
    """Strip the NUL (9p mount_tag) and newline (sysfs_emit) padding; empty → None."""
    if text is None:
        return None
    text = text.strip("\0 \t\r\n")
    return text or None


_DIGITS = "0123456789"


def _natural_key(name: str) -> tuple[str, int, str]:
    """ "virtio10" sorts after "virtio3": (letters, number, rest)."""
    i = 0
    while i < len(name) and name[i] not in _DIGITS:
        i += 1
    j = i
    while j < len(name) and name[j] in _DIGITS:
        j += 1
    return (name[:i], int(name[i:j]) if j > i else -1, name[j:])


def _is_virtio_component(part: str) -> bool:
    """A sysfs path component "virtioN" (the virtio device a block device sits on)."""
    return part.startswith("virtio") and len(part) > 6 and all(c in _DIGITS for c in part[6:])


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path), key=_natural_key)
    except OSError:
        return []


def parse_virtio_id(text: str | None) -> int | None:
    """The virtio `device` attribute: hex such as "0x0009"."""
    text = _clean(text)
    if text is None:
        return None
    try:
        return int(text, 16)
    except ValueError:
        return None


def virtio_devices(sysfs: str = "/sys") -> list[tuple[str, int, str | None]]:
    """(name, virtio device id, bound driver or None) for each virtio device."""
    base = os.path.join(sysfs, "bus/virtio/devices")
    out: list[tuple[str, int, str | None]] = []
    for name in _listdir(base):
        dev = os.path.join(base, name)
        devid = parse_virtio_id(_read(os.path.join(dev, "device")))
        if devid is None:
            continue
        try:
            driver: str | None = os.path.basename(os.readlink(os.path.join(dev, "driver")))
        except OSError:
            driver = None
        out.append((name, devid, driver))
    return out


def virtio_transport(path: str) -> str | None:
    """The transport of the virtio device at sysfs PATH (a virtioN directory, a link to one,
    or anything below one, such as a block device's): "pci", "mmio" (virtio-mmio devices are
    platform devices: ACPI LNRO0005, device tree "virtio,mmio", virtio_mmio.device=), or
    the name of another bus its parent sits on ("ccw"); None when not found."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    for i in range(len(parts) - 1, 0, -1):
        if _is_virtio_component(parts[i]):
            parent = os.sep.join(parts[:i])
            break
    else:
        return None
    try:
        bus = os.path.basename(os.readlink(os.path.join(parent, "subsystem")))
    except OSError:
        return None
    return "mmio" if bus == "platform" else bus


def virtiofs_tags_readable(sysfs: str = "/sys") -> bool:
    """True when the kernel publishes virtiofs tags (>= 6.9, virtiofs loaded)."""
    return os.path.isdir(os.path.join(sysfs, "fs/virtiofs"))


def _virtiofs_tags(sysfs: str) -> dict[str, str]:
    """virtio device name → tag, from /sys/fs/virtiofs/N/{tag,device}."""
    base = os.path.join(sysfs, "fs/virtiofs")
    tags: dict[str, str] = {}
    for entry in _listdir(base):
        tag = _clean(_read(os.path.join(base, entry, "tag")))
        device = os.path.realpath(os.path.join(base, entry, "device"))
        if tag is not None:
            tags[os.path.basename(device)] = tag
    return tags


def scan_shares(sysfs: str = "/sys") -> list[VirtioShare]:
    """Every virtio-9p and virtio-fs device, with its tag when readable.

    9p tags come from `mount_tag` (only once 9pnet_virtio is bound). virtiofs
    tags need kernel >= 6.9; before that such devices are listed with tag None.
    """
    fs_tags: dict[str, str] | None = None
    shares: list[VirtioShare] = []
    for name, devid, _driver in virtio_devices(sysfs):
        if devid == VIRTIO_ID_9P:
            path = os.path.join(sysfs, "bus/virtio/devices", name, "mount_tag")
            shares.append(VirtioShare("9p", _clean(_read(path)), name))
        elif devid == VIRTIO_ID_FS:
            if fs_tags is None:
                fs_tags = _virtiofs_tags(sysfs)
            shares.append(VirtioShare("virtiofs", fs_tags.get(name), name))
    return shares


def parse_devnum(text: str | None) -> tuple[int, int] | None:
    """The `dev` attribute: "MAJ:MIN"."""
    text = _clean(text)
    if text is None:
        return None
    major, sep, minor = text.partition(":")
    if not sep:
        return None
    try:
        return (int(major), int(minor))
    except ValueError:
        return None


def _int(text: str | None, default: int = 0) -> int:
    text = _clean(text)
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _uevent_devname(text: str | None) -> str | None:
    for line in (text or "").splitlines():
        key, _, value = line.partition("=")
        if key == "DEVNAME" and value:
            return value
    return None


def scan_block_devices(sysfs: str = "/sys") -> list[BlockDevice]:
    """Block devices from /sys/class/block, skipping ram*, zram* and empty loops."""
    base = os.path.join(sysfs, "class/block")
    out: list[BlockDevice] = []
    for name in _listdir(base):
        if name.startswith(("ram", "zram")):
            continue
        node = os.path.join(base, name)
        devnum = parse_devnum(_read(os.path.join(node, "dev")))
        if devnum is None:
            continue
        size = _int(_read(os.path.join(node, "size"))) * 512
        if name.startswith("loop") and size == 0:
            continue
        real = os.path.realpath(node)
        partition = os.path.exists(os.path.join(node, "partition"))
        parent = os.path.basename(os.path.dirname(real)) if partition else None
        serial = None
        if not partition:
            serial = _clean(_read(os.path.join(sysfs, "block", name, "serial")))
            if serial is None:
                serial = _clean(_read(os.path.join(node, "device/serial")))
        devname = _uevent_devname(_read(os.path.join(node, "uevent")))
        out.append(
            BlockDevice(
                name=name,
                devnode="/dev/" + (devname or name.replace("!", "/")),
                devnum=devnum,
                serial=serial,
                virtio=any(_is_virtio_component(c) for c in real.split(os.sep)),
                partition=partition,
                size_bytes=size,
                read_only=_int(_read(os.path.join(node, "ro"))) == 1,
                parent=parent,
            )
        )
    return out


def describe_shares(sysfs: str = "/sys") -> list[str]:
    """The virtio shares there now, for a timeout message."""
    return [
        f"{s.proto} {s.tag!r}" if s.tag else f"{s.proto} (tag not readable on this kernel)"
        for s in scan_shares(sysfs)
    ]

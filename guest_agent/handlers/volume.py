"""Block volumes (virtio-blk disks): found by LABEL=, UUID=, SERIAL= or a /dev/ path.

The filesystem type is read from the superblock (FSTYPE, when given, must match
it); read-only filesystems and the store's lower layer mount `ro` by default; a
refusal the kernel explains by a read-only device or a damaged filesystem gets
a hint (add ro; run fsck: a disk is never formatted over).
"""

from __future__ import annotations

from guest_agent.handlers.base import mount_device, read_only_default
from guest_agent.kernel.mountinfo import devnum
from guest_agent.results import Failure, Result, Status, occupied
from guest_agent.spec import EXT_FAMILY

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.devices.discovery import Devices
    from guest_agent.handlers.base import Context
    from guest_agent.kernel.mountinfo import Mount
    from guest_agent.spec import Options, VolumeSpec

READ_ONLY_FILESYSTEMS = frozenset({"erofs", "squashfs", "iso9660"})


def volume_options(fstype: str, options: Options, store_lower: bool) -> tuple[str, ...]:
    return read_only_default(fstype in READ_ONLY_FILESYSTEMS or store_lower, options)


def same_fstype(wanted: str, found: str) -> bool:
    return wanted == found or (wanted in EXT_FAMILY and found in EXT_FAMILY)


class VolumeHandler:
    """A block volume's mount: a Handler[VolumeSpec]."""

    __slots__ = ("spec",)

    def __init__(self, spec: VolumeSpec) -> None:
        self.spec = spec

    def present(self, ctx: Context) -> bool:
        spec = self.spec
        try:
            return ctx.devices.look(lambda: ctx.devices.find_disk(spec)) is not None
        except Failure:
            return True  # run it now: its own step reports the problem

    def dry_run(self, ctx: Context, store_lower: bool = False) -> Result:
        spec = self.spec
        ctx.target(spec.where)
        return Result(
            spec.where,
            spec.source,
            Status.WOULD_MOUNT,
            spec.fstype,
            spec.what,
            volume_options(spec.fstype, spec.options, store_lower),
        )

    def mount(self, ctx: Context, store_lower: bool = False) -> Result:
        spec = self.spec
        host = ctx.target(spec.where)
        devices = ctx.devices
        device = devices.wait(lambda: devices.find_disk(spec), devices.deadline(spec.options))
        if device is None:
            raise _timeout(spec, devices)
        current = ctx.existing(host)
        if current is not None:
            if current.devnum == devnum(device) or current.source == device:
                return ctx.already(spec.where, spec.source, current)
            raise occupied(spec.where, current)
        fstype = _fstype(ctx, spec, device)
        devices.need_filesystem(fstype)
        options = volume_options(fstype, spec.options, store_lower)
        return mount_device(ctx, spec, fstype, device, host, options)

    def matches(self, current: Mount, devices: Devices) -> bool:
        try:
            device = devices.find_disk(self.spec)
        except Failure:
            return False
        if device is None:
            return False
        number = devnum(device)
        if number is None:
            return False
        return bool(current.devnum == number or current.source == device)


def _fstype(ctx: Context, spec: VolumeSpec, device: str) -> str:
    """The filesystem to mount DEVICE as (formatting a blank disk first with x-makefs)."""
    from guest_agent.devices.probe import probe_device

    try:
        signature = probe_device(device)
    except OSError as e:
        raise Failure(f"cannot read {device}: {e.strerror}") from None
    if spec.options.makefs and signature is None:
        from guest_agent.handlers.makefs import prepare

        signature = prepare(ctx, spec, device, signature)
    if signature is None:
        raise Failure(
            f"{device} carries no filesystem signature",
            "add x-makefs (with FSTYPE) to format a blank disk",
        )
    if signature.usage != "filesystem":
        raise Failure(f"{device} holds {signature.fstype}, not a filesystem to mount")
    if spec.fstype != "auto" and not same_fstype(spec.fstype, signature.fstype):
        raise Failure(
            f"{device} holds {signature.fstype}, not {spec.fstype}",
            "x-makefs never formats a disk that already holds a filesystem"
            if spec.options.makefs
            else None,
        )
    return spec.fstype if spec.fstype != "auto" else signature.fstype


def _timeout(spec: VolumeSpec, devices: Devices) -> Failure:
    seen = devices.disks_seen()
    return Failure(
        f"no disk {spec.what} appeared within {spec.options.device_timeout:g} s"
        f" (virtio disks seen: {', '.join(seen) or 'none'})",
        "check the disk given to the hypervisor, raise x-device-timeout=, or add nofail",
    )

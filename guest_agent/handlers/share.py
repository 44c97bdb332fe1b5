"""virtio-9p and virtio-fs shares: found by tag, mounted with the agent's defaults.

A virtiofs tag this kernel cannot list (before 6.9) is only known to be missing
when the mount says so (EINVAL/ENOENT): the mount is retried on each uevent
until the deadline. A share whose host directory is gone mounts but is unusable:
it is unmounted again and reported.
"""

from __future__ import annotations

import errno
import os

from guest_agent.kernel.mount import MountError, MountRequest, umount
from guest_agent.kernel.mountinfo import in_root
from guest_agent.results import Failure, Result, Status, occupied, refused
from guest_agent.spec import SHARE_FSTYPES, Proto

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.devices.discovery import Devices
    from guest_agent.handlers.base import Context
    from guest_agent.kernel.mountinfo import Mount
    from guest_agent.spec import Options, ShareSpec

# 9p: the virtio transport carries at most PAGE_SIZE * (VIRTQUEUE_NUM - 3) = 512000 bytes a
# message on 4 KiB pages; a larger msize is clamped by the kernel (see docs/defaults.md).
NINEP_MSIZE = "512000"


def share_options(proto: str, options: Options, read_only: bool) -> tuple[str, ...]:
    """Kernel options for a share: the agent's defaults, then the user's (which win)."""
    chosen: list[str] = []
    if proto == Proto.NINEP:
        # An immutable store can be cached aggressively; a read-write share must stay
        # coherent with the host: mmap caches only what is mmap'ed.
        defaults = {
            "trans": "virtio",
            "version": "9p2000.L",
            "msize": NINEP_MSIZE,
            "cache": "loose" if read_only else "mmap",
        }
        chosen += [f"{k}={v}" for k, v in defaults.items() if not options.has(k)]
    if read_only and options.read_only is None:
        chosen.append("ro")
    return (*chosen, *options.kernel)


class ShareHandler:
    """A 9p or virtiofs share's mount: a Handler[ShareSpec]."""

    __slots__ = ("spec",)

    def __init__(self, spec: ShareSpec) -> None:
        self.spec = spec

    def present(self, ctx: Context) -> bool:
        spec = self.spec
        return ctx.devices.look(lambda: ctx.devices.locate_share(spec)[0]) is not None

    def _prepare(self, ctx: Context, store_lower: bool) -> tuple[str, bool, Result | None]:
        """The checks before mounting (or not): the target, what is there, the 9p channel."""
        spec = self.spec
        host = ctx.target(spec.where)
        read_only = spec.options.read_only
        read_only = store_lower if read_only is None else read_only
        table = ctx.table()
        current = table.visible_at(host)
        if current is not None:
            if current.fstype in SHARE_FSTYPES and current.source == spec.tag:
                if spec.proto in (Proto.AUTO, current.fstype):
                    return host, read_only, ctx.already(spec.where, spec.source, current)
            raise occupied(spec.where, current)
        in_use = table.tag_in_use(spec.tag, (Proto.NINEP,))
        if in_use is not None and spec.proto != Proto.VIRTIOFS:
            raise Failure(
                f"9p tag {spec.tag!r} is already mounted at {in_root(ctx.root, in_use.mount_point)}:"
                " a 9p channel mounts once",
                "bind-mount that directory instead",
            )
        return host, read_only, None

    def dry_run(self, ctx: Context, store_lower: bool = False) -> Result:
        _, read_only, done = self._prepare(ctx, store_lower)
        if done is not None:
            return done
        spec = self.spec
        proto = str(spec.proto)
        return Result(
            spec.where,
            spec.source,
            Status.WOULD_MOUNT,
            proto,
            spec.tag,
            share_options(proto, spec.options, read_only),
        )

    def mount(self, ctx: Context, store_lower: bool = False) -> Result:
        host, read_only, done = self._prepare(ctx, store_lower)
        if done is not None:
            return done
        spec = self.spec
        devices = ctx.devices

        def attempt() -> Result | None:
            found, blind = devices.locate_share(spec)
            if found is None:
                return None
            devices.need_filesystem(found)
            options = share_options(found, spec.options, read_only)
            try:
                ctx.do_mount(MountRequest(found, spec.tag, host, options))
            except MountError as e:
                # A virtiofs tag this kernel cannot list is only known to be missing
                # when the mount says so (EINVAL): keep waiting for it then.
                if not (blind and e.errno in (errno.EINVAL, errno.ENOENT)):
                    raise refused(found, e) from None
                return None
            _check_share_root(ctx, spec, found, host)
            return ctx.mounted(spec, found, spec.tag, spec.tag, options)

        result = devices.wait(attempt, devices.deadline(spec.options))
        if result is None:
            raise _timeout(spec, devices)
        return result

    def matches(self, current: Mount, devices: Devices) -> bool:
        return bool(current.fstype in SHARE_FSTYPES and current.source == self.spec.tag)


def _check_share_root(ctx: Context, spec: ShareSpec, proto: str, host: str) -> None:
    """A share whose directory the host deleted still mounts (qemu and virtiofsd hold
    it open), but is unusable: 9p shows an empty root with no links, where nothing can
    be created; virtiofs fails every access. Unmount it again and say so."""
    try:
        gone = os.stat(host).st_nlink == 0
        reason = "its root directory has been deleted on the host (it has no links)"
    except OSError as e:
        gone = True
        reason = f"its root cannot be read: {e.strerror}"
    if not gone:
        return
    try:
        umount(host)
    except MountError:
        umount(host, lazy=True)
    ctx.log.unmounted(host)
    raise Failure(
        f"{proto} share {spec.tag!r} mounted but is unusable, so it was unmounted again: {reason}",
        "the host side of the share is gone: check the directory the hypervisor exports "
        "under this tag (qemu -fsdev path=, virtiofsd --shared-dir)",
    )


def _timeout(spec: ShareSpec, devices: Devices) -> Failure:
    seen = devices.shares_seen()
    kind = "virtio share" if spec.proto == Proto.AUTO else f"{spec.proto} share"
    waited = spec.options.device_timeout
    return Failure(
        f"no {kind} tagged {spec.tag!r} appeared within {waited:g} s"
        f" (seen: {', '.join(seen) or 'none'})",
        "check the tag given to the hypervisor, raise x-device-timeout=, or add nofail",
    )

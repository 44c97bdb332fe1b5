"""Filesystems with no device (tmpfs, ramfs): nothing to find or wait for."""

from __future__ import annotations

from guest_agent.handlers.base import mount_device, read_only_default
from guest_agent.results import Result, Status, occupied

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.devices.discovery import Devices
    from guest_agent.handlers.base import Context
    from guest_agent.kernel.mountinfo import Mount
    from guest_agent.spec import PseudoSpec


class PseudoHandler:
    """A tmpfs's or ramfs's mount: a Handler[PseudoSpec]."""

    __slots__ = ("spec",)

    def __init__(self, spec: PseudoSpec) -> None:
        self.spec = spec

    def present(self, ctx: Context) -> bool:
        return True

    def _prepare(self, ctx: Context) -> tuple[str, Result | None]:
        spec = self.spec
        host = ctx.target(spec.where)
        current = ctx.existing(host)
        if current is not None:
            if current.fstype == spec.fstype:
                return host, ctx.already(spec.where, spec.source, current)
            raise occupied(spec.where, current)
        return host, None

    def dry_run(self, ctx: Context, store_lower: bool = False) -> Result:
        _, done = self._prepare(ctx)
        if done is not None:
            return done
        spec = self.spec
        options = read_only_default(store_lower, spec.options)
        return Result(spec.where, spec.source, Status.WOULD_MOUNT, spec.fstype, spec.what, options)

    def mount(self, ctx: Context, store_lower: bool = False) -> Result:
        host, done = self._prepare(ctx)
        if done is not None:
            return done
        spec = self.spec
        options = read_only_default(store_lower, spec.options)
        ctx.devices.need_filesystem(spec.fstype)
        return mount_device(ctx, spec, spec.fstype, spec.what, host, options)

    def matches(self, current: Mount, devices: Devices) -> bool:
        return bool(current.fstype == self.spec.fstype)

"""Filesystems with no device (tmpfs, ramfs): nothing to find or wait for."""

from __future__ import annotations

from guest_agent.handlers.base import mount_device, read_only_default
from guest_agent.results import Result, Status, occupied
from guest_agent.spec import PseudoSpec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.devices import Devices
    from guest_agent.handlers.base import Context
    from guest_agent.mountinfo import Mount
    from guest_agent.plan import Step
    from guest_agent.spec import MountSpec


class PseudoHandler:
    def present(self, spec: MountSpec, ctx: Context) -> bool:
        return True

    def _prepare(self, step: Step, ctx: Context) -> tuple[PseudoSpec, str, Result | None]:
        spec = step.spec
        assert isinstance(spec, PseudoSpec)
        host = ctx.target(spec.where)
        current = ctx.existing(host)
        if current is not None:
            if current.fstype == spec.fstype:
                return spec, host, ctx.already(spec.where, spec.source, current)
            raise occupied(spec.where, current)
        return spec, host, None

    def dry_run(self, step: Step, ctx: Context) -> Result:
        spec, _, done = self._prepare(step, ctx)
        if done is not None:
            return done
        options = read_only_default(step.store_lower, spec.options)
        return Result(spec.where, spec.source, Status.WOULD_MOUNT, spec.fstype, spec.what, options)

    def mount(self, step: Step, ctx: Context) -> Result:
        spec, host, done = self._prepare(step, ctx)
        if done is not None:
            return done
        options = read_only_default(step.store_lower, spec.options)
        ctx.devices.need_filesystem(spec.fstype)
        return mount_device(ctx, spec, spec.fstype, spec.what, host, options)

    def matches(self, spec: MountSpec, current: Mount, devices: Devices) -> bool:
        assert isinstance(spec, PseudoSpec)
        return bool(current.fstype == spec.fstype)


HANDLER = PseudoHandler()

"""One handler per mount kind: share, volume, pseudo (tmpfs, ramfs), overlay.

Each answers the same four questions about its spec (see `base.Handler`): is
its device present now (no waiting)? what would a dry run do? mount it (may
wait; raises `Failure`)? does a mount in the table match it (for `status`)?
`handler_for` is the switch on the spec's type; it imports a handler's module
the first time that kind is met, so a boot pays only for the kinds it uses.
`named_filesystems` says, without importing any, which filesystem types a spec
names before anything is looked at (their modules can then load together).
"""

from __future__ import annotations

from guest_agent.spec import OverlaySpec, Proto, PseudoSpec, ShareSpec, VolumeSpec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.handlers.base import Handler
    from guest_agent.spec import MountSpec


def handler_for(spec: MountSpec) -> Handler:
    if isinstance(spec, ShareSpec):
        from guest_agent.handlers.share import HANDLER as share

        return share
    if isinstance(spec, VolumeSpec):
        from guest_agent.handlers.volume import HANDLER as volume

        return volume
    if isinstance(spec, PseudoSpec):
        from guest_agent.handlers.pseudo import HANDLER as pseudo

        return pseudo
    assert isinstance(spec, OverlaySpec)
    from guest_agent.handlers.overlay import HANDLER as overlay

    return overlay


def named_filesystems(spec: MountSpec) -> tuple[str, ...]:
    """The filesystem types mounting SPEC takes, as far as SPEC says (`auto` says none)."""
    if isinstance(spec, ShareSpec):
        return () if spec.proto == Proto.AUTO else (spec.proto,)
    if isinstance(spec, (VolumeSpec, PseudoSpec)):
        return () if spec.fstype == "auto" else (spec.fstype,)
    return ("overlay",)

"""One handler per mount kind: share, volume, pseudo (tmpfs, ramfs), overlay.

A handler is made for one spec and answers the same four questions about it
(see `base.Handler`): is its device present now (no waiting)? what would a dry
run do? mount it (may wait; raises `Failure`)? does a mount in the table match
it (for `status`)? `handler_for` is the switch on the spec's type; it imports a
handler's module the first time that kind is met, so a boot pays only for the
kinds it uses. `named_filesystems` says, without importing any, which
filesystem types a spec names before anything is looked at (their modules can
then load together).

May import: devices, nixdb, reset, plan, results, report, kernel, spec, records.
"""

from __future__ import annotations

from guest_agent.spec import Proto, PseudoSpec, ShareSpec, VolumeSpec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.handlers.base import Handler
    from guest_agent.spec import MountSpec


def handler_for(spec: MountSpec) -> Handler[MountSpec]:
    """The handler for SPEC, made for it: the one place a spec's type is switched on.

    The handler takes SPEC at birth, narrowed here, rather than in each method:
    overloads cannot serve a caller holding a `MountSpec` (a union in gives a union
    of handlers whose methods each refuse the union), and a (handler, spec) pair loses
    for mypy the tie between the two once unpacked. Bound, the pair is one value mypy
    checks: `ShareHandler(spec)` type-checks only with a `ShareSpec`, and is a
    `Handler[ShareSpec]`, so a `Handler[MountSpec]` (covariant). The cost is one small
    object a call, in place of an `isinstance` assert a method.
    """
    if isinstance(spec, ShareSpec):
        from guest_agent.handlers.share import ShareHandler

        return ShareHandler(spec)
    if isinstance(spec, VolumeSpec):
        from guest_agent.handlers.volume import VolumeHandler

        return VolumeHandler(spec)
    if isinstance(spec, PseudoSpec):
        from guest_agent.handlers.pseudo import PseudoHandler

        return PseudoHandler(spec)
    from guest_agent.handlers.overlay import OverlayHandler

    return OverlayHandler(spec)  # the union's last kind: mypy knows it is an OverlaySpec


def named_filesystems(spec: MountSpec) -> tuple[str, ...]:
    """The filesystem types mounting SPEC takes, as far as SPEC says (`auto` says none)."""
    if isinstance(spec, ShareSpec):
        return () if spec.proto == Proto.AUTO else (spec.proto,)
    if isinstance(spec, (VolumeSpec, PseudoSpec)):
        return () if spec.fstype == "auto" else (spec.fstype,)
    return ("overlay",)

"""The /nix/store overlay: LOWER read-only, RW/store the upper layer, RW/work its work dir.

The layers are handed to overlayfs as the directories the agent opened and
checked (`/proc/self/fd/N`), so nothing on the RW volume can swap a symlink in
between the check and the mount. A pending reset (the cmdline flag, or a request
`reset-overlay` left on RW) moves the upper layer aside before mounting.
"""

from __future__ import annotations

import errno
import os

from guest_agent import reset as overlay_reset
from guest_agent.handlers.layers import check_overlap, in_use, overlay_users, wrong_type
from guest_agent.kernel.mount import MountError, MountRequest, umount
from guest_agent.kernel.mountinfo import in_root
from guest_agent.kernel.paths import host_path, reopen
from guest_agent.kernel.syscalls import closing
from guest_agent.plan import upper_on_9p
from guest_agent.results import Failure, Result, Status, occupied, refused
from guest_agent.spec import UPPER_DIR, WORK_DIR, Proto, join

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

    from guest_agent.devices.discovery import Devices
    from guest_agent.handlers.base import Context
    from guest_agent.kernel.mountinfo import Mount
    from guest_agent.kernel.paths import Opened
    from guest_agent.spec import Options, OverlaySpec

OVERLAY_SAFE_DEFAULTS = ("index", "metacopy", "redirect_dir", "xino")


def _escape_layer(path: str) -> str:
    # overlayfs splits lowerdir on ':' and the option string on ','; escape both.
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_options(
    lower: str, upper: str, work: str, options: Options, userxattr: bool
) -> tuple[str, ...]:
    chosen = [
        f"lowerdir={_escape_layer(lower)}",
        f"upperdir={_escape_layer(upper)}",
        f"workdir={_escape_layer(work)}",
    ]
    if userxattr and not options.has("userxattr"):
        chosen.append("userxattr")
    use_xattr = userxattr or options.has("userxattr")
    for feature in OVERLAY_SAFE_DEFAULTS:
        if options.has(feature):
            continue
        if use_xattr and feature in ("redirect_dir", "metacopy"):
            continue  # userxattr turns these off itself, and refuses them given explicitly
        chosen.append(f"{feature}=off")
    return (*chosen, *options.kernel)


class OverlayHandler:
    """The store overlay's mount: a Handler[OverlaySpec]."""

    __slots__ = ("spec",)

    def __init__(self, spec: OverlaySpec) -> None:
        self.spec = spec

    def present(self, ctx: Context) -> bool:
        return True  # its layers are mounts of their own, which run first

    def dry_run(self, ctx: Context, store_lower: bool = False) -> Result:
        spec = self.spec
        host = ctx.target(spec.where)
        current = ctx.existing(host)
        if current is not None:
            if current.fstype == "overlay":
                return ctx.already(spec.where, spec.source, current)
            raise occupied(spec.where, current)
        userxattr = _upper_needs_userxattr(ctx, spec, ctx.target(spec.rw))
        # Shown as the guest sees them (no --root prefix), like a real mount's result.
        options = overlay_options(spec.lower, spec.upper, spec.work, spec.options, userxattr)
        return Result(spec.where, spec.source, Status.WOULD_MOUNT, "overlay", "overlay", options)

    def mount(self, ctx: Context, store_lower: bool = False) -> Result:
        spec = self.spec
        host = ctx.target(spec.where)
        with ctx.open_dir(spec.rw, create=True) as rw_path, ctx.open_dir(spec.lower) as lower:
            rw = reopen(rw_path.fd)
            try:
                return _mount_on(ctx, spec, host, lower, rw_path, rw)
            finally:
                os.close(rw)

    def matches(self, current: Mount, devices: Devices) -> bool:
        return bool(current.fstype == "overlay")


def _mount_on(
    ctx: Context, spec: OverlaySpec, host: str, lower: Opened, rw_path: Opened, rw: int
) -> Result:
    """Mount the overlay with LOWER, RW/store and RW/work given to the kernel as the
    directories we hold open (/proc/self/fd/N), never as paths it would resolve again."""
    table = ctx.table()
    current = table.visible_at(host)
    reset = ctx.reset_requested or _owned(spec, overlay_reset.request_pending, rw)
    if current is not None:
        if current.fstype == "overlay":
            # A cmdline flag was applied by this boot's first run; a scheduled request
            # (reset-overlay while mounted) waits for the next boot.
            if reset and not ctx.reset_requested:
                ctx.reporter.info(
                    f"{spec.where} is already mounted: the scheduled reset applies at the next boot"
                )
            return ctx.already(spec.where, spec.source, current)
        raise occupied(spec.where, current)
    wrong = overlay_reset.check_names(rw, resetting=reset, nix_db=spec.nix_db)
    if wrong:
        raise wrong_type(spec, *wrong)
    rw_host = host_path(ctx.root, rw_path.path)
    userxattr = _upper_needs_userxattr(ctx, spec, rw_host)
    # Before anything is made or moved: a reset must never move the lower layer aside.
    check_overlap(spec, lower.fd, rw, whole_rw=True)
    if overlay_reset.check_dir(rw, UPPER_DIR):
        with closing(overlay_reset.open_dir(rw, UPPER_DIR, create=False)) as store:
            users = overlay_users(table, host, store)
        if users:
            raise in_use(
                spec, in_root(ctx.root, users[0].mount_point), "not mounting it a second time"
            )
    if reset:
        _reset(ctx, rw, spec)
    store = _layer_dir(ctx, rw, UPPER_DIR, spec)
    try:
        work = _layer_dir(ctx, rw, WORK_DIR, spec)
        try:
            check_overlap(spec, lower.fd, rw)
            lower_fd, store_fd, work_fd = (f"/proc/self/fd/{fd}" for fd in (lower.fd, store, work))
            options = overlay_options(lower_fd, store_fd, work_fd, spec.options, userxattr)
            ctx.devices.need_filesystem("overlay")
            state_host = None
            if spec.nix_db:  # its module only when the option is used
                from guest_agent.handlers.nix_state import mount_nix_state

                state_host = mount_nix_state(ctx, spec, lower, rw, store, table)
            try:
                ctx.do_mount(MountRequest("overlay", "overlay", host, options))
            except MountError as e:
                if state_host is not None:
                    umount(state_host)
                    ctx.log.unmounted(state_host)
                raise refused("overlay", e) from None
        finally:
            os.close(work)
    finally:
        os.close(store)
    _empty_trash(ctx, rw, spec)
    # The layers as the guest sees them (the in-root paths they were reached by), not the
    # /proc/self/fd/N the kernel was given nor the --root prefixed host paths.
    shown = overlay_options(
        lower.path,
        join(rw_path.path, UPPER_DIR),
        join(rw_path.path, WORK_DIR),
        spec.options,
        userxattr,
    )
    ctx.reporter.info(
        f"mounted overlay at {spec.where} (lower {spec.lower}, upper {spec.upper}"
        + (", userxattr" if "userxattr" in options else "")
        + ")"
    )
    return Result(spec.where, spec.source, Status.MOUNTED, "overlay", "overlay", shown)


def _upper_needs_userxattr(ctx: Context, spec: OverlaySpec, rw: str) -> bool:
    """userxattr when RW (or RW/store) lives on virtiofs/FUSE; a 9p upper is refused."""
    table = ctx.table()
    userxattr = False
    upper = os.path.join(rw, UPPER_DIR)
    for path in (rw, upper):  # something could be mounted on RW/store itself
        holder = table.containing(path)
        if holder is None:
            continue
        if holder.fstype == Proto.NINEP:
            problem = upper_on_9p(
                spec, f"{holder.source} at {in_root(ctx.root, holder.mount_point)}"
            )
            raise Failure(problem.reason, problem.hint)
        userxattr = userxattr or holder.fstype == Proto.VIRTIOFS or holder.fstype.startswith("fuse")
    return userxattr


def _owned(spec: OverlaySpec, look: Callable[[int], bool], rw: int) -> bool:
    try:
        return look(rw)
    except overlay_reset.WrongType as e:
        raise wrong_type(spec, e) from None


def _layer_dir(ctx: Context, rw: int, name: str, spec: OverlaySpec) -> int:
    """Open RW/NAME (made if missing); on a full RW volume, first delete the trash of a
    reset (the only way to get the space back), synchronously since the overlay needs
    the dir now."""
    try:
        try:
            return overlay_reset.open_dir(rw, name, create=True)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            trash = overlay_reset.open_trash(rw)
            if trash is None:
                raise
        ctx.reporter.info(
            f"{spec.rw} is full: deleting the old upper layer now, before mounting {spec.where}"
        )
        with closing(trash):
            overlay_reset.empty_trash(trash)
        return overlay_reset.open_dir(rw, name, create=True)
    except overlay_reset.WrongType as e:
        raise wrong_type(spec, e) from None
    except OSError as e:
        raise Failure(f"cannot create {spec.rw}/{name}: {e.strerror}") from None


def _empty_trash(ctx: Context, rw: int, spec: OverlaySpec) -> None:
    """Delete what an earlier reset moved aside, in the background. A trash that is not
    the agent's directory is left alone and reported."""
    try:
        trash = overlay_reset.open_trash(rw)
    except overlay_reset.WrongType as e:
        ctx.reporter.info(
            f"warning: {spec.rw}/{e}: the trash is left alone (remove it by hand if it is not yours)"
        )
        return
    except OSError:
        return
    if trash is not None:
        with closing(trash):
            overlay_reset.empty_trash_in_background(trash)


def _reset(ctx: Context, rw: int, spec: OverlaySpec) -> None:
    """Apply a pending reset: move the upper layer aside (deleted in the background)."""
    try:
        moved = overlay_reset.move_aside(rw, nix_db=spec.nix_db)
    except overlay_reset.WrongType as e:
        raise wrong_type(spec, e) from None
    except OSError as e:
        raise Failure(
            f"reset of the upper layer failed: {e.strerror}; nothing was mounted"
        ) from None
    ctx.reporter.info(
        f"reset the {spec.where} upper layer: moved {moved} dir(s) of {spec.rw} aside, "
        "deleting them in the background"
    )

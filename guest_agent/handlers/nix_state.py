"""The x-nix-db part of the store overlay: reconcile Nix's database on RW (guest_agent.nixdb.state)
and bind-mount RW/nix-state at /nix/var/nix, before the overlay is mounted.

Imported by the overlay handler only for an overlay with x-nix-db.
"""

from __future__ import annotations

from guest_agent import reset as overlay_reset
from guest_agent.kernel.mount import BIND, MountError, MountRequest
from guest_agent.kernel.paths import PathError, reopen
from guest_agent.kernel.syscalls import closing
from guest_agent.results import Failure
from guest_agent.spec import NIX_STATE_DIR, NIX_STATE_MOUNT_POINT, OverlaySpec, Problem

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.handlers.base import Context
    from guest_agent.kernel.mountinfo import MountTable
    from guest_agent.kernel.paths import Opened


def mount_nix_state(
    ctx: Context, spec: OverlaySpec, lower: Opened, rw: int, store: int, table: MountTable
) -> str | None:
    """x-nix-db: reconcile Nix's database on RW with the layers (before the overlay is
    mounted: the upper layer is cleaned first), then bind-mount RW/nix-state at
    /nix/var/nix. A failure is reported and leaves /nix/var/nix alone; the overlay
    is still mounted. TABLE is the mount table as the overlay's step read it (nothing
    was mounted since). Returns the host path of the bind mount."""
    why = _reconcile_database(ctx, spec, lower, rw, store)
    if why is not None:
        ctx.reporter.problem(
            Problem(
                spec.source,
                f"Nix database not reconciled: {why[0]}; {NIX_STATE_MOUNT_POINT} is not mounted",
                why[1],
            )
        )
        return None
    try:
        target = ctx.target(NIX_STATE_MOUNT_POINT)
        current = table.visible_at(target)
        if current is not None:
            raise Failure(f"it is already a mount point ({current.fstype} {current.source})")
        from guest_agent.nixdb.state import open_state

        with closing(open_state(rw)) as state:
            ctx.do_mount(MountRequest(BIND, f"/proc/self/fd/{state}", target))
    except (Failure, MountError, OSError, PathError, overlay_reset.WrongType) as e:
        reason = e.reason if isinstance(e, Failure) else _words(e)
        ctx.reporter.problem(
            Problem(
                spec.source,
                f"the Nix database was reconciled, but {spec.rw}/{NIX_STATE_DIR} could not be"
                f" mounted at {NIX_STATE_MOUNT_POINT}: {reason}",
                f"a read-only root needs the mount point {NIX_STATE_MOUNT_POINT} in its image"
                f" (as it needs {spec.where})",
            )
        )
        return None
    ctx.reporter.info(f"mounted {spec.rw}/{NIX_STATE_DIR} at {NIX_STATE_MOUNT_POINT}")
    return target


def _words(e: Exception) -> str:
    if isinstance(e, MountError):
        return f"the kernel refused the bind mount: {e}"
    if isinstance(e, OSError):
        return f"{e.strerror}: {e.filename}" if e.filename else f"{e.strerror}"
    return str(e)


def _reconcile_database(
    ctx: Context, spec: OverlaySpec, lower: Opened, rw: int, store: int
) -> tuple[str, str | None] | None:
    """Run the reconcile (nixstate); None when it went through, else (why, hint)."""
    from guest_agent.nixdb import state as nixstate

    try:
        with closing(reopen(lower.fd)) as lower_fd:
            nixstate.reconcile(
                nixstate.Layers(lower_fd, rw, store), spec.reg_info, ctx.reporter.info
            )
    except ImportError as e:
        return (
            f"Python's sqlite3 module is missing here ({e})",
            "the initrd must carry _sqlite3 and libsqlite3 (see docs/nix-db.md)",
        )
    except overlay_reset.WrongType as e:
        return f"{spec.rw}/{e}", f"remove {spec.rw}/{e.name} by hand if it is not yours"
    except (nixstate.NixStateError, OSError) as e:
        return _words(e), None
    except Exception as e:  # nixstate lets nothing else out; kept so the overlay mounts regardless
        return f"unexpected {type(e).__name__}: {e}", None
    return None

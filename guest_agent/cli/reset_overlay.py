"""`guest-agent reset-overlay`: wipe the store's upper layer now, or schedule it for the next boot."""

from __future__ import annotations

import os

from guest_agent import reset as overlay_reset
from guest_agent.cli import LockFailed, exit_code, lock
from guest_agent.config.inputs import load, sources
from guest_agent.config.merge import DEFAULT_CMDLINE
from guest_agent.devices.discovery import Devices
from guest_agent.handlers.base import Context
from guest_agent.handlers.layers import overlay_users
from guest_agent.kernel.mountinfo import MountTable, in_root
from guest_agent.kernel.paths import PathError, host_path, landing, open_root, reopen, walk
from guest_agent.plan import is_within, plan
from guest_agent.report import Reporter
from guest_agent.results import MountLog
from guest_agent.runner import Runner
from guest_agent.spec import UPPER_DIR, Config, OverlaySpec, Problem

RESET = "reset-overlay"
# docs/reference.md "Commands" shows these (tests/unit/test_reference_outputs.py checks).
EXIT_CODES = {
    0: "wiped, scheduled for the next boot (the overlay is in use), or nothing to wipe",
    1: "nothing was wiped: no overlay configured, its upper layer in use or not the agent's,"
    " another run holds the lock; or an input has an error",
}


def reset_overlay(
    root: str = "/", config: str | None = None, cmdline: str = DEFAULT_CMDLINE
) -> int:
    """Wipe the /nix/store upper layer: now if the overlay is not mounted, else at next boot."""
    reporter = Reporter()
    src = sources(root, config, cmdline)
    spec_config = load(src, reporter, say_if_empty=False)  # reset_command says what is missing
    try:
        held = lock(src.root)
    except LockFailed as e:
        reporter.problem(Problem("guest-agent reset-overlay", str(e), "nothing was reset"))
        return exit_code(reporter)
    try:
        reset_command(src.root, spec_config, reporter)
    finally:
        os.close(held)
    return exit_code(reporter)


def reset_command(root: str, config: Config, reporter: Reporter) -> None:
    """Schedule the reset when the overlay is in use; otherwise wipe the upper layer now."""
    overlay = config.overlay
    if overlay is None:
        reporter.problem(
            Problem(RESET, "no store overlay is configured", "set microvm.store-overlay=LOWER:RW")
        )
        return
    store = landing(root, overlay.where)
    table = MountTable.read()
    current = table.visible_at(store) if store else None
    if current is not None and current.fstype == "overlay":
        _schedule(root, overlay, reporter)
        return
    # Not mounted: mount what RW lives on (if needed), wipe, and leave mounts as found.
    steps, problems = plan(config)
    for problem in problems:
        reporter.problem(problem)
    needed = [s for s in steps if s.spec is not overlay and is_within(overlay.rw, s.where)]
    # Whatever this mounts is unmounted again when the block ends (the mount log's undo).
    with (
        Devices(reporter) as devices,
        MountLog() as log,
        Context(root, reporter, devices, log) as ctx,
    ):
        runner = Runner(ctx)
        for step in needed:
            runner.run_step(step)
        # Judge by what got mounted, not by reporter.failed: a malformed unrelated spec must
        # not block the wipe, and a failed nofail RW volume must not let it wipe the bare dir.
        if any(not log.in_place(s.where) for s in needed):
            reporter.problem(
                Problem(RESET, "nothing was wiped: the RW volume could not be mounted")
            )
            return
        try:
            opened = ctx.open_dir(overlay.rw)
        except PathError:
            reporter.info(f"{overlay.rw} does not exist: nothing to wipe")
            return
        with opened:
            rw = reopen(opened.fd)
        try:
            _wipe(root, rw, store or host_path(root, overlay.where), overlay, reporter)
        finally:
            os.close(rw)


def _schedule(root: str, overlay: OverlaySpec, reporter: Reporter) -> None:
    try:
        root_fd = open_root(root)
        try:
            with walk(root_fd, overlay.rw) as opened:
                rw = reopen(opened.fd)
        finally:
            os.close(root_fd)
    except (PathError, OSError) as e:
        reporter.problem(Problem(RESET, f"{overlay.rw} cannot be opened: {e}"))
        return
    try:
        overlay_reset.schedule(rw)
    except overlay_reset.WrongType as e:
        reporter.problem(
            Problem(
                RESET,
                f"{overlay.rw}/{e}: not following it, nothing was scheduled",
                f"remove {overlay.rw}/{e.name} by hand if it is not yours",
            )
        )
        return
    except OSError as e:
        reporter.problem(Problem(RESET, f"cannot record the request in {overlay.rw}: {e.strerror}"))
        return
    finally:
        os.close(rw)
    reporter.info(
        f"{overlay.where} is in use: wiping it live is unsafe; the reset is scheduled "
        "and the next mount-all (next boot) applies it"
    )


def _wipe(root: str, rw: int, where: str, overlay: OverlaySpec, reporter: Reporter) -> None:
    """Move the layers of RW (an fd) aside and delete them, unless any mount still uses them."""
    wrong = overlay_reset.check_names(rw, resetting=True, nix_db=overlay.nix_db)
    if wrong:
        for e in wrong:
            reporter.problem(
                Problem(
                    RESET,
                    f"{overlay.rw}/{e}: not following or deleting it, nothing was wiped",
                    f"remove {overlay.rw}/{e.name} by hand if it is not yours",
                )
            )
        return
    try:
        if overlay_reset.check_dir(rw, UPPER_DIR):
            store = overlay_reset.open_dir(rw, UPPER_DIR, create=False)
            try:
                users = overlay_users(MountTable.read(), where, store)
            finally:
                os.close(store)
            if users:
                reporter.problem(
                    Problem(
                        RESET,
                        f"the upper layer {overlay.upper} is in use by the overlay"
                        f" mounted at {in_root(root, users[0].mount_point)}: nothing was wiped",
                        "unmount every mount of that overlay first",
                    )
                )
                return
        if overlay.nix_db:
            from guest_agent.nixdb.state import state_mounts

            busy = state_mounts(MountTable.read(), rw)
            if busy:
                shown = in_root(root, busy[0].mount_point)
                reporter.problem(
                    Problem(
                        RESET,
                        f"the Nix state directory {overlay.rw}/nix-state is mounted at"
                        f" {shown}: nothing was wiped",
                        f"unmount {shown} first",
                    )
                )
                return
        moved = overlay_reset.move_aside(rw, nix_db=overlay.nix_db)
        trash = overlay_reset.open_trash(rw)
        if trash is not None:
            try:
                overlay_reset.empty_trash(trash)
            finally:
                os.close(trash)
    except overlay_reset.WrongType as e:
        reporter.problem(Problem(RESET, f"{overlay.rw}/{e}: nothing more was wiped"))
        return
    except OSError as e:
        reporter.problem(Problem(RESET, f"wiping {overlay.rw} failed: {e.strerror}"))
        return
    reporter.info(f"wiped the {overlay.where} upper layer in {overlay.rw} ({moved} dir(s) deleted)")

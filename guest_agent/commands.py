"""The commands other than mount-all: reset-overlay, status and discover."""

from __future__ import annotations

import os
from typing import Any

from guest_agent import reset as overlay_reset
from guest_agent.execute import Executor, Failure, overlay_users
from guest_agent.mountinfo import MountTable
from guest_agent.paths import (
    PathError,
    host_path,
    open_root,
    reopen,
    resolve_as_far_as_exists,
    walk,
)
from guest_agent.plan import is_within, plan
from guest_agent.report import Reporter
from guest_agent.spec import Config, OverlaySpec, Problem, ShareSpec, VolumeSpec

RESET = "reset-overlay"


def _host(root: str, where: str) -> str | None:
    """The host path where WHERE lands (as far as it exists: a mount point may be hidden
    under a later mount, where its directory is not to be seen)."""
    try:
        root_fd = open_root(root)
    except OSError:
        return None
    try:
        return host_path(root, resolve_as_far_as_exists(root_fd, where))
    except PathError:
        return None
    finally:
        os.close(root_fd)


def reset_command(root: str, config: Config, reporter: Reporter) -> None:
    """Schedule the reset when the overlay is in use; otherwise wipe the upper layer now."""
    overlay = config.overlay
    if overlay is None:
        reporter.problem(
            Problem(RESET, "no store overlay is configured", "set microvm.store-overlay=LOWER:RW")
        )
        return
    store = _host(root, overlay.where)
    table = MountTable.read()
    current = table.visible_at(store) if store else None
    if current is not None and current.fstype == "overlay":
        _schedule(root, overlay, reporter)
        return
    # Not mounted: mount what RW lives on (if needed), wipe, and leave mounts as found.
    steps, problems = plan(config)
    for problem in problems:
        reporter.problem(problem)
    needed = [
        s for s in steps if not isinstance(s.spec, OverlaySpec) and is_within(overlay.rw, s.where)
    ]
    executor = Executor(root, reporter)
    try:
        for step in needed:
            executor.run_step(step)
        # Judge by what got mounted, not by reporter.failed: a malformed unrelated spec must
        # not block the wipe, and a failed nofail RW volume must not let it wipe the bare dir.
        if any(s.where not in executor.mounted for s in needed):
            reporter.problem(
                Problem(RESET, "nothing was wiped: the RW volume could not be mounted")
            )
            return
        try:
            opened = executor.open_dir(overlay.rw)
        except PathError:
            reporter.info(f"{overlay.rw} does not exist: nothing to wipe")
            return
        with opened:
            rw = reopen(opened.fd)
        try:
            _wipe(rw, store or host_path(root, overlay.where), overlay, reporter)
        finally:
            os.close(rw)
    finally:
        executor.undo()
        executor.close()


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


def _wipe(rw: int, where: str, overlay: OverlaySpec, reporter: Reporter) -> None:
    """Move the layers of RW (an fd) aside and delete them, unless any mount still uses them."""
    wrong = overlay_reset.check_names(rw, resetting=True)
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
        if overlay_reset.check_dir(rw, "store"):
            store = overlay_reset.open_dir(rw, "store", create=False)
            try:
                users = overlay_users(MountTable.read(), where, store)
            finally:
                os.close(store)
            if users:
                reporter.problem(
                    Problem(
                        RESET,
                        f"the upper layer {overlay.upper} is in use by the overlay"
                        f" mounted at {users[0].mount_point}: nothing was wiped",
                        "unmount every mount of that overlay first",
                    )
                )
                return
        moved = overlay_reset.move_aside(rw)
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


def mount_status(root: str, config: Config) -> list[dict[str, Any]]:
    """One row per configured mount: does the kernel show it as planned?"""
    steps, _ = plan(config)
    table = MountTable.read()
    probe = Executor(root, Reporter(kmsg=None), dry_run=True)
    rows = []
    for step in steps:
        spec = step.spec
        row: dict[str, Any] = {
            "where": spec.where,
            "spec": spec.source,
            "required": not spec.options.nofail,
            "fstype": None,
            "source": None,
        }
        host = _host(root, spec.where)
        current = table.visible_at(host) if host else None
        hidden = table.at(host) if host and current is None else None
        cover = table.hidden_by(hidden) if hidden is not None else None
        if hidden is not None and cover is not None:
            row.update(
                state="hidden",
                fstype=hidden.fstype,
                source=hidden.source,
                detail=f"{hidden.fstype} {hidden.source} is mounted there but hidden by"
                f" {cover.fstype} {cover.source} at {cover.mount_point}",
            )
        elif current is None:
            row.update(state="not-mounted", detail="nothing mounted there")
        else:
            row.update(fstype=current.fstype, source=current.source)
            ok = _matches(spec, current, probe)
            row.update(
                state="mounted" if ok else "different",
                detail=f"{current.fstype} {current.source}"
                + ("" if ok else " (not what is configured)"),
            )
        if isinstance(spec, OverlaySpec):
            row["reset_pending"] = _reset_pending(root, spec)
            if row["reset_pending"]:
                row["detail"] += "; reset pending for the next boot"
        rows.append(row)
    return rows


def _reset_pending(root: str, overlay: OverlaySpec) -> bool:
    try:
        root_fd = open_root(root)
        try:
            with walk(root_fd, overlay.rw) as opened:
                return overlay_reset.request_pending(opened.fd)
        finally:
            os.close(root_fd)
    except (PathError, OSError, overlay_reset.WrongType):
        return False


def _matches(spec: Any, current: Any, probe: Executor) -> bool:
    if isinstance(spec, ShareSpec):
        return bool(current.fstype in ("9p", "virtiofs") and current.source == spec.tag)
    if isinstance(spec, OverlaySpec):
        return bool(current.fstype == "overlay")
    assert isinstance(spec, VolumeSpec)
    if spec.by[0] == "pseudo":
        return bool(current.fstype == spec.fstype)
    try:
        device = probe._find_disk(spec)
    except Failure:
        return False
    if device is None:
        return False
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return False
    return bool(current.devnum == (os.major(rdev), os.minor(rdev)) or current.source == device)


def discover_all(
    *, all_disks: bool = False, sysfs: str = "/sys"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every virtio share and disk (loading the virtio drivers first, as mount-all does)."""
    from guest_agent.kmod import ModuleLoader
    from guest_agent.probe import probe_device
    from guest_agent.sysfs import scan_block_devices, scan_shares, virtiofs_tags_readable

    notes = list(ModuleLoader(sysfs=sysfs).coldplug_virtio())
    items: list[dict[str, Any]] = []
    shares = scan_shares(sysfs)
    for share in shares:
        items.append(
            {"kind": "share", "tag": share.tag, "proto": share.proto, "device": share.device}
        )
    if any(s.tag is None for s in shares) and not virtiofs_tags_readable(sysfs):
        notes.append(
            "this kernel (before 6.9) does not show virtiofs tags to userspace; "
            "mount-all tries a tag that no 9p device carries as virtiofs"
        )
    for dev in scan_block_devices(sysfs):
        if not (dev.virtio or all_disks):
            continue
        try:
            sig = probe_device(dev.devnode) if dev.size_bytes else None
        except OSError as e:
            sig = None
            notes.append(f"{dev.devnode}: cannot read: {e.strerror}")
        items.append(
            {
                "kind": "disk",
                "tag": None,
                "proto": None,
                "name": dev.name,
                "dev": dev.devnode,
                "serial": dev.serial,
                "label": sig.label if sig else None,
                "uuid": sig.uuid if sig else None,
                "fstype": sig.fstype if sig else None,
                "size": dev.size_bytes,
                "read_only": dev.read_only,
                "partition": dev.partition,
            }
        )
    return items, notes


def render(items: list[dict[str, Any]]) -> str:
    lines = []
    for item in items:
        if item["kind"] == "share":
            tag = item["tag"] if item["tag"] is not None else "(tag not readable)"
            lines.append(f"share  {item['proto']:<9} {tag:<24} {item['device']}")
        else:
            lines.append(
                f"disk   {item['dev']:<12} serial={item['serial'] or '-'} label={item['label'] or '-'}"
                f" uuid={item['uuid'] or '-'} fstype={item['fstype'] or '-'} size={item['size']}"
            )
    return "\n".join(lines) if lines else "no virtio shares or disks found"

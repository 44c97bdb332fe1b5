"""`guest-agent status`: each configured mount, and whether the kernel shows it as planned."""

from __future__ import annotations

import os
from typing import Any

from guest_agent import reset as overlay_reset
from guest_agent.commands import exit_code, print_json, write
from guest_agent.config import DEFAULT_CMDLINE
from guest_agent.execute import Executor, Failure
from guest_agent.inputs import load, sources
from guest_agent.mountinfo import MountTable
from guest_agent.paths import PathError, landing, open_root, walk
from guest_agent.plan import plan
from guest_agent.report import Reporter
from guest_agent.spec import Config, OverlaySpec, ShareSpec, VolumeSpec


def status(
    root: str = "/",
    config: str | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    as_json: bool = False,
) -> int:
    """Each configured mount and whether the kernel shows it as planned (1 if a required one is not)."""
    reporter = Reporter(kmsg=None)
    src = sources(root, config, cmdline)
    spec_config = load(src, reporter)
    rows = mount_status(src.root, spec_config)
    if as_json:
        print_json(rows)
    else:
        for row in rows:
            write(f"{row['state']:<12} {row['where']:<24} {row['detail']}\n")
    unhealthy = any(row["state"] != "mounted" and row["required"] for row in rows)
    return 1 if exit_code(reporter) or unhealthy else 0


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
        host = landing(root, spec.where)
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

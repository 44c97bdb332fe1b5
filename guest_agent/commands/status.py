"""`guest-agent status`: each configured mount, and whether the kernel shows it as planned."""

from __future__ import annotations

import os
from typing import Any

from guest_agent import reset as overlay_reset
from guest_agent.commands import exit_code, print_json, write
from guest_agent.config import DEFAULT_CMDLINE
from guest_agent.devices import Devices
from guest_agent.handlers import handler_for
from guest_agent.inputs import load, sources
from guest_agent.mountinfo import MountTable
from guest_agent.paths import PathError, landing, open_root, reopen, walk
from guest_agent.plan import plan
from guest_agent.records import NamedTuple
from guest_agent.report import Reporter
from guest_agent.results import NOAUTO
from guest_agent.spec import Config, OverlaySpec
from guest_agent.syscalls import closing


class State:
    """`StatusRow.state`."""

    MOUNTED = "mounted"  # as configured
    DIFFERENT = "different"  # something else is mounted there
    NOT_MOUNTED = "not-mounted"
    HIDDEN = "hidden"  # mounted, but covered by a later mount


class StatusRow(NamedTuple):
    where: str
    spec: str
    required: bool
    fstype: str | None
    source: str | None
    state: str  # one of State's
    detail: str
    reset_pending: bool | None = None  # for the overlay only
    nix_db: dict[str, Any] | None = None  # for an x-nix-db overlay (nixrecord.describe)

    def as_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "where": self.where,
            "spec": self.spec,
            "required": self.required,
            "fstype": self.fstype,
            "source": self.source,
            "state": self.state,
            "detail": self.detail,
        }
        if self.reset_pending is not None:
            row["reset_pending"] = self.reset_pending
        if self.nix_db is not None:
            row["nix_db"] = self.nix_db
        return row

    @property
    def healthy(self) -> bool:
        return self.state == State.MOUNTED or not self.required


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
        print_json([row.as_json() for row in rows])
    else:
        for row in rows:
            write(f"{row.state:<12} {row.where:<24} {row.detail}\n")
    unhealthy = not all(row.healthy for row in rows)
    return 1 if exit_code(reporter) or unhealthy else 0


def mount_status(root: str, config: Config) -> list[StatusRow]:
    """One row per configured mount: does the kernel show it as planned?"""
    steps, _ = plan(config)
    overlay = config.overlay
    table = MountTable.read()
    rows = []
    with Devices() as devices:  # looks only: no driver is loaded, nothing waited for
        for step in steps:
            spec = step.spec
            host = landing(root, spec.where)
            current = table.visible_at(host) if host else None
            hidden = table.at(host) if host and current is None else None
            cover = table.hidden_by(hidden) if hidden is not None else None
            fstype = source = None
            if hidden is not None and cover is not None:
                state, fstype, source = State.HIDDEN, hidden.fstype, hidden.source
                detail = (
                    f"{hidden.fstype} {hidden.source} is mounted there but hidden by"
                    f" {cover.fstype} {cover.source} at {cover.mount_point}"
                )
            elif current is None:
                state = State.NOT_MOUNTED
                detail = NOAUTO if spec.options.noauto else "nothing mounted there"
            else:
                fstype, source = current.fstype, current.source
                ok = handler_for(spec).matches(spec, current, devices)
                state = State.MOUNTED if ok else State.DIFFERENT
                detail = f"{current.fstype} {current.source}" + (
                    "" if ok else " (not what is configured)"
                )
            pending = nix_db = None
            if spec is overlay and overlay is not None:  # a reset may be scheduled for it
                pending = _reset_pending(root, overlay)
                if pending:
                    detail += "; reset pending for the next boot"
                if overlay.nix_db:
                    nix_db = _nix_db(root, overlay)
                    detail += "; " + _nix_line(nix_db)
            rows.append(
                StatusRow(
                    spec.where,
                    spec.source,
                    not (spec.options.nofail or spec.options.noauto),
                    fstype,
                    source,
                    state,
                    detail,
                    pending,
                    nix_db,
                )
            )
    return rows


def _nix_db(root: str, overlay: OverlaySpec) -> dict[str, Any]:
    from guest_agent.nixrecord import describe

    try:
        root_fd = open_root(root)
        try:
            with walk(root_fd, overlay.rw) as opened, closing(reopen(opened.fd)) as rw:
                return describe(rw)
        finally:
            os.close(root_fd)
    except (PathError, OSError) as e:
        return {"state": "unreadable", "valid_paths": None, "error": str(e)}


def _nix_line(info: dict[str, Any]) -> str:
    from guest_agent.nixrecord import describe_line

    return describe_line(info)


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

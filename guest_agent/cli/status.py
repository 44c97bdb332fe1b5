"""`guest-agent status`: each configured mount, and whether the kernel shows it as planned."""

from __future__ import annotations

import time
from typing import Any

from guest_agent.cli import (
    exit_code,
    json_output,
    print_json,
    record_dir,
    write,
)
from guest_agent.cli.record import read_record
from guest_agent.cli.status_overlay import Layer, nix_line, overlay_layers, reset_pending
from guest_agent.cli.status_overlay import nix_db as nix_db_state
from guest_agent.config.inputs import load, sources
from guest_agent.config.merge import DEFAULT_CMDLINE
from guest_agent.devices.discovery import Devices
from guest_agent.handlers import handler_for
from guest_agent.kernel.mountinfo import MountTable, in_root
from guest_agent.kernel.paths import landing
from guest_agent.plan import plan
from guest_agent.records import NamedTuple
from guest_agent.report import Reporter
from guest_agent.results import NOAUTO
from guest_agent.spec import Config, Problem

# docs/reference.md "Commands" and "JSON output" show these (test_reference_outputs.py).
EXIT_CODES = {
    0: "every required mount is mounted as configured, and the inputs have no error",
    1: "a required mount is not-mounted, different or hidden, or an input has an error",
}
JSON_LIST = "mounts"
EXTRA_KEYS = ("boot",)  # status's own top-level key: the last boot's record (record.read_record)
STATUS_FIELDS = (
    "where", "spec", "required", "fstype", "source", "state", "detail",
    "reset_pending", "nix_db", "layers",
)  # fmt: skip


class State:
    """`StatusRow.state`."""

    MOUNTED = "mounted"  # as configured
    DIFFERENT = "different"  # something else is mounted there
    NOT_MOUNTED = "not-mounted"
    HIDDEN = "hidden"  # mounted, but covered by a later mount

    ALL = (MOUNTED, DIFFERENT, NOT_MOUNTED, HIDDEN)


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
    layers: dict[str, Layer] | None = None  # for the overlay only: LAYER_NAMES

    def as_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "spec": self.spec,
            "required": self.required,
            "fstype": self.fstype,
            "source": self.source,
            "state": self.state,
            "detail": self.detail,
            "reset_pending": self.reset_pending,
            "nix_db": self.nix_db,
            "layers": None
            if self.layers is None
            else {name: layer.as_json() for name, layer in self.layers.items()},
        }

    def lines(self) -> list[str]:
        first = f"{self.state:<12} {self.where:<24} {self.detail}"
        layers = self.layers or {}
        return [first] + [f"{'':<13}{layer.line(name)}" for name, layer in layers.items()]

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
    rows, problems = mount_status(src.root, spec_config)
    for problem in problems:
        reporter.problem(problem)
    unhealthy = not all(row.healthy for row in rows)
    code = 1 if exit_code(reporter) or unhealthy else 0
    boot = last_record()
    if as_json:
        payload = json_output(
            code == 0, JSON_LIST, [row.as_json() for row in rows], reporter.problems
        )
        print_json({**payload, "boot": boot})
    else:
        for row in rows:
            write("".join(line + "\n" for line in row.lines()))
        reporter.info(boot_line(boot))  # on stderr: stdout keeps one line per mount
    return code


def last_record() -> dict[str, Any] | None:
    return read_record(record_dir())


def boot_line(record: dict[str, Any] | None) -> str:
    """What the last boot's mount-all said, beside the live view above it."""
    if record is None:
        return "at boot: no record (mount-all has not run since the guest started)"
    from guest_agent.vmm_notify import summary

    line, _ = summary(record.get("mounts") or [], record.get("problems") or [])
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("started") or 0))
    return f"at boot ({when}, exit status {record.get('exit_status')}): {line.removeprefix('guest-agent: ')}"


def mount_status(root: str, config: Config) -> tuple[list[StatusRow], list[Problem]]:
    """One row per configured mount: does the kernel show it as planned? And the plan's
    problems (a conflict, an upper layer on 9p), which mount-all would report too."""
    steps, problems = plan(config)
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
            layers = None
            if hidden is not None and cover is not None:
                state, fstype, source = State.HIDDEN, hidden.fstype, hidden.source
                detail = (
                    f"{hidden.fstype} {hidden.source} is mounted there but hidden by"
                    f" {cover.fstype} {cover.source} at {in_root(root, cover.mount_point)}"
                )
            elif current is None:
                state = State.NOT_MOUNTED
                detail = NOAUTO if spec.options.noauto else "nothing mounted there"
            else:
                fstype, source = current.fstype, current.source
                ok = handler_for(spec).matches(current, devices)
                if spec is overlay and overlay is not None:
                    layers = overlay_layers(root, overlay, host, current)
                    ok = ok and all(layer.matches is not False for layer in layers.values())
                state = State.MOUNTED if ok else State.DIFFERENT
                detail = f"{current.fstype} {current.source}" + (
                    "" if ok else " (not what is configured)"
                )
            pending = nix_db = None
            if spec is overlay and overlay is not None:  # a reset may be scheduled for it
                if layers is None:  # not mounted there: the configured paths alone
                    layers = overlay_layers(root, overlay, host, None)
                pending = reset_pending(root, overlay)
                if pending:
                    detail += "; reset pending for the next boot"
                if overlay.nix_db:
                    nix_db = nix_db_state(root, overlay)
                    detail += "; " + nix_line(nix_db)
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
                    layers,
                )
            )
    return rows, problems



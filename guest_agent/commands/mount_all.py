"""`guest-agent mount-all`: the boot path."""

from __future__ import annotations

import os
import time

from guest_agent.commands import (
    exit_code,
    json_output,
    print_json,
    record_dir,
    summary,
    write,
    write_record,
)
from guest_agent.config import DEFAULT_CMDLINE
from guest_agent.inputs import load, sources
from guest_agent.lock import LockFailed, lock

# docs/reference.md "Commands" shows these (tests/unit/test_reference_outputs.py checks).
EXIT_CODES = {
    0: "every required mount is in place (a failed `nofail` one is a warning)",
    1: "a required mount failed, an input is malformed or unreadable, or another run holds the lock",
}
JSON_LIST = "mounts"

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

    from guest_agent.devices import Devices
    from guest_agent.report import Reporter
    from guest_agent.vmm_notify import Host


def mount_all(
    root: str = "/",
    config: str | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    dry_run: bool = False,
    as_json: bool = False,
) -> int:
    """Discover, plan and mount everything; build the overlay; apply a pending reset."""
    from guest_agent.devices import Devices
    from guest_agent.handlers.base import Context
    from guest_agent.mountlog import MountLog
    from guest_agent.plan import plan
    from guest_agent.report import KMSG, Reporter
    from guest_agent.spec import Problem

    started = time.time()
    reporter = Reporter(kmsg=None if dry_run else KMSG)
    src = sources(root, config, cmdline)
    spec_config = load(src, reporter)
    steps, problems = plan(spec_config)
    for problem in problems:
        reporter.problem(problem)
    held = None
    if not dry_run:
        try:
            held = lock(src.root)
        except LockFailed as e:
            reporter.problem(Problem("guest-agent mount-all", str(e), "nothing was mounted"))
            if as_json:
                print_json(json_output(False, JSON_LIST, [], reporter.problems))
            return exit_code(reporter)
    from guest_agent.runner import Runner

    try:
        with (
            Devices(reporter) as devices,
            Context(
                src.root,
                reporter,
                devices,
                MountLog(),  # the mounts stay: no undo
                dry_run=dry_run,
                reset_requested=spec_config.reset_overlay,
            ) as ctx,
        ):
            host = None if dry_run else find_host(src.cmdline_text, reporter, devices)
            if host is not None:
                host.tell([("STATUS", "guest-agent: mounting")])
            results = Runner(ctx).run(steps)
            payload = json_output(
                not reporter.failed, JSON_LIST, [r.as_json() for r in results], reporter.problems
            )
            if not dry_run:
                record(payload, started, reporter)
            if host is not None:
                line, fields = summary(payload["mounts"], payload["problems"])
                host.tell([("STATUS", line), *fields])
    finally:
        if held is not None:
            os.close(held)
    if as_json:
        print_json(payload)
    elif dry_run:
        for r in results:
            write(f"{r.status} {r.fstype} {r.source} at {r.where} ({','.join(r.options)})\n")
    return exit_code(reporter)


def find_host(cmdline_text: str, reporter: Reporter, devices: Devices) -> Host | None:
    """The VMM's notify socket when the vmm.notify_socket credential is given (docs/host.md);
    without it, one read of the SMBIOS table and no import."""
    table = _read_table()
    if "vmm.notify_socket" not in cmdline_text and b"vmm.notify_socket" not in table:
        return None
    from guest_agent.spec import Problem
    from guest_agent.vmm_notify import Host

    def warn(origin: str, reason: str) -> None:
        reporter.problem(Problem(origin, reason, fatal=False))

    return Host.find(cmdline_text, table, warn, devices.modules().load)


DMI_TABLE = "/sys/firmware/dmi/tables/DMI"  # the raw SMBIOS table: its OEM strings (type 11)


def _read_table() -> bytes:
    try:
        fd = os.open(DMI_TABLE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, 1 << 20)
    except OSError:
        return b""
    finally:
        os.close(fd)


def record(payload: dict[str, Any], started: float, reporter: Reporter) -> None:
    """/run/guest-agent/boot.json: this run's mounts and problems, its times and exit status."""
    why = write_record(
        {
            **payload,
            "started": round(started, 3),
            "finished": round(time.time(), 3),
            "exit_status": 1 if reporter.failed else 0,
        },
        record_dir(),
    )
    if why is not None:
        from guest_agent.spec import Problem

        reporter.problem(Problem("guest-agent mount-all", f"no boot record: {why}", fatal=False))

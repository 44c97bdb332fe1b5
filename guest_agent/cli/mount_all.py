"""`guest-agent mount-all`: the boot path."""

from __future__ import annotations

import os
import time

from guest_agent.cli import (
    JSON_VERSION,
    LockFailed,
    exit_code,
    json_output,
    lock,
    print_json,
    problem_json,
    record_dir,
    write,
    write_record,
)
from guest_agent.config.inputs import load, sources
from guest_agent.config.merge import DEFAULT_CMDLINE

# docs/reference.md "Commands" shows these (tests/unit/test_reference_outputs.py checks).
EXIT_CODES = {
    0: "every required mount is in place (a failed `nofail` one is a warning)",
    1: "a required mount failed, an input is malformed or unreadable, or another run holds the lock",
}
JSON_LIST = "mounts"

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.devices.discovery import Devices
    from guest_agent.report import Reporter
    from guest_agent.results import Result
    from guest_agent.spec import Problem
    from guest_agent.vmm_notify import Host


def mount_all(
    root: str = "/",
    config: str | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    dry_run: bool = False,
    as_json: bool = False,
) -> int:
    """Discover, plan and mount everything; build the overlay; apply a pending reset."""
    from guest_agent.devices.discovery import Devices
    from guest_agent.handlers.base import Context
    from guest_agent.plan import plan
    from guest_agent.report import KMSG, Reporter
    from guest_agent.results import MountLog
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
            if not dry_run:
                record(results, reporter, started)
            if host is not None:
                from guest_agent.vmm_notify import summary

                line, fields = summary(
                    [r.as_json() for r in results], [problem_json(p) for p in reporter.problems]
                )
                host.tell([("STATUS", line), *fields])
    finally:
        if held is not None:
            os.close(held)
    if as_json:
        ok = not reporter.failed
        print_json(json_output(ok, JSON_LIST, [r.as_json() for r in results], reporter.problems))
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

    return Host.find(cmdline_text, table, warn, lambda name: devices.modules().load(name))


DMI_TABLE = "/sys/firmware/dmi/tables/DMI"  # the raw SMBIOS table: its OEM strings (type 11)


def _read_table() -> bytes:
    try:
        fd = os.open(DMI_TABLE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, min(os.fstat(fd).st_size or 1 << 16, 1 << 20))  # sysfs knows its size
    except OSError:
        return b""
    finally:
        os.close(fd)


def record(results: list[Result], reporter: Reporter, started: float) -> None:
    """/run/guest-agent/boot.json: this run's mounts and problems, its times and exit status."""
    text = record_text(
        results, reporter.problems, started, time.time(), 1 if reporter.failed else 0
    )
    why = write_record(text, record_dir())
    if why is not None:
        from guest_agent.spec import Problem

        reporter.problem(Problem("guest-agent mount-all", f"no boot record: {why}", fatal=False))


def record_text(
    results: list[Result], problems: list[Problem], started: float, finished: float, status: int
) -> str:
    """The record as JSON text (record.RECORD_FIELDS): mount-all's --json object plus
    its run."""
    # Every boot writes it, so the values go in as they are, and the whole text is checked
    # once: printable ASCII without a backslash, and exactly the quotes the shape has (2
    # per key and per string), so no value held a quote. Else record.record_json escapes.
    mounts = ", ".join(
        [
            f'{{"where": "{r.where}", "spec": "{r.spec}", "status": "{r.status}", '
            f'"fstype": {"null" if r.fstype is None else _Q + r.fstype + _Q}, '
            f'"source": {"null" if r.source is None else _Q + r.source + _Q}, '
            f'"options": [{_Q + _SEP.join(r.options) + _Q if r.options else ""}], '
            f'"message": {"null" if r.message is None else _Q + r.message + _Q}}}'
            for r in results
        ]
    )
    listed = ", ".join(
        [
            f'{{"spec": "{p.spec}", "reason": "{p.reason}", '
            f'"hint": {"null" if p.hint is None else _Q + p.hint + _Q}, '
            f'"fatal": {"true" if p.fatal else "false"}}}'
            for p in problems
        ]
    )
    text = (
        f'{{"version": {JSON_VERSION}, "ok": {"false" if status else "true"}, '
        f'"mounts": [{mounts}], "problems": [{listed}], '
        f'"started": {started:.3f}, "finished": {finished:.3f}, "exit_status": {status}}}'
    )
    nones = sum([r.count(None) for r in results]) + sum([p.count(None) for p in problems])
    options = sum([len(r.options) for r in results])
    quotes = 14 + 26 * len(results) + 14 * len(problems) + 2 * (options - nones)
    if text.isascii() and text.encode().translate(None, _PLAIN) == b'"' * quotes:
        return text + "\n"
    from guest_agent.cli.record import record_json  # a value to escape: rare

    return record_json(results, problems, started, finished, status)


_Q, _SEP = '"', '", "'
# printable ASCII but the quote and the backslash
_PLAIN = (
    b" !#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~"
)

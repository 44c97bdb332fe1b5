"""`guest-agent mount-all`: the boot path."""

from __future__ import annotations

import os

from guest_agent.commands import exit_code, json_output, print_json, write
from guest_agent.config import DEFAULT_CMDLINE
from guest_agent.inputs import load, sources
from guest_agent.lock import LockFailed, lock

# docs/reference.md "Commands" shows these (tests/unit/test_reference_outputs.py checks).
EXIT_CODES = {
    0: "every required mount is in place (a failed `nofail` one is a warning)",
    1: "a required mount failed, an input is malformed or unreadable, or another run holds the lock",
}
JSON_LIST = "mounts"


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
            results = Runner(ctx).run(steps)
    finally:
        if held is not None:
            os.close(held)
    if as_json:
        print_json(
            json_output(
                not reporter.failed, JSON_LIST, [r.as_json() for r in results], reporter.problems
            )
        )
    elif dry_run:
        for r in results:
            write(f"{r.status} {r.fstype} {r.source} at {r.where} ({','.join(r.options)})\n")
    return exit_code(reporter)

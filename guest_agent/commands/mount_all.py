"""`guest-agent mount-all`: the boot path."""

from __future__ import annotations

import os

from guest_agent.commands import exit_code, print_json, write
from guest_agent.config import DEFAULT_CMDLINE
from guest_agent.inputs import load, sources
from guest_agent.lock import LockFailed, lock


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
                print_json(
                    {"ok": False, "mounts": [], "problems": [str(p) for p in reporter.problems]}
                )
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
            {
                "ok": not reporter.failed,
                "mounts": [r.as_json() for r in results],
                "problems": [str(p) for p in reporter.problems],
            }
        )
    elif dry_run:
        for r in results:
            write(f"{r.status} {r.fstype} {r.source} at {r.where} ({','.join(r.options)})\n")
    return exit_code(reporter)

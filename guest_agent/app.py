"""The commands' bodies, free of click: load specs, run the layers, return exit codes.

Exit status: 0 when everything required is mounted, 1 when a required mount
failed or a spec was malformed. (2, bad usage, is the CLI's.) Kernel-facing
modules are imported inside the command that needs them, so that the boot
path (`mount-all`) pays for nothing else.
"""

from __future__ import annotations

import os
import sys

from guest_agent.config import DEFAULT_CMDLINE, DEFAULT_CONFIG
from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

    from guest_agent.report import Reporter
    from guest_agent.spec import Config

LOCK_PATHS = ("/run/guest-agent.lock", "/tmp/guest-agent.lock")
LOCK_TIMEOUT = 120


class Sources(NamedTuple):
    root: str  # real path of the target root
    config: str
    config_given: bool
    cmdline: str


def sources(root: str = "/", config: str | None = None, cmdline: str = DEFAULT_CMDLINE) -> Sources:
    return Sources(os.path.realpath(root), config or DEFAULT_CONFIG, config is not None, cmdline)


def load(src: Sources, reporter: Reporter) -> Config:
    """Read and merge the config file and the command line; report their problems."""
    from guest_agent.config import Parsed, merge, parse_cmdline, parse_config_json
    from guest_agent.spec import Problem

    layers: list[Parsed] = []
    text = _read(src.config)
    if text is not None:
        layers.append(parse_config_json(text, src.config))
    elif src.config_given:
        layers.append(Parsed(problems=(Problem(src.config, "cannot read the config file"),)))
    cmdline = _read(src.cmdline)
    if cmdline is None:
        layers.append(Parsed(problems=(Problem(src.cmdline, "cannot read the command line"),)))
    else:
        layers.append(parse_cmdline(cmdline))
    config, problems, notes = merge(layers)
    for problem in problems:
        reporter.problem(problem)
    for note in notes:
        reporter.info(note)
    return config


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


class _LockTimeout(Exception):
    pass


def lock(timeout: int = LOCK_TIMEOUT) -> int | None:
    """Serialise runs (two at once must not mount twice): an exclusive flock, held until exit.

    A run that waits longer than TIMEOUT seconds for another one gives up
    (exit 1) instead of hanging the boot.
    """
    import _signal as signal  # type: ignore[import-not-found]  # C module; `signal` imports enum
    import fcntl

    for path in LOCK_PATHS:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue

        def expired(_signum: int, _frame: object) -> None:
            raise _LockTimeout

        previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(timeout)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except _LockTimeout:
            os.close(fd)
            sys.stderr.write(f"error: another guest-agent run has held {path} for {timeout} s\n")
            sys.exit(1)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        return fd
    return None


def _print_json(payload: Any) -> None:
    import json

    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def _exit_code(reporter: Reporter) -> int:
    reporter.close()
    return 1 if reporter.failed else 0


def mount_all(
    root: str = "/",
    config: str | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    dry_run: bool = False,
    as_json: bool = False,
) -> int:
    """Discover, plan and mount everything; build the overlay; apply a pending reset."""
    from guest_agent.execute import Executor
    from guest_agent.plan import plan
    from guest_agent.report import Reporter

    reporter = Reporter(kmsg=None if dry_run else "/dev/kmsg")
    src = sources(root, config, cmdline)
    spec_config = load(src, reporter)
    steps, problems = plan(spec_config)
    for problem in problems:
        reporter.problem(problem)
    held = None if dry_run else lock()
    executor = Executor(
        src.root, reporter, dry_run=dry_run, reset_requested=spec_config.reset_overlay
    )
    try:
        results = executor.run(steps)
    finally:
        executor.close()
        if held is not None:
            os.close(held)
    if as_json:
        _print_json(
            {
                "ok": not reporter.failed,
                "mounts": [r.as_json() for r in results],
                "problems": [str(p) for p in reporter.problems],
            }
        )
    elif dry_run:
        for r in results:
            sys.stdout.write(
                f"{r.status} {r.fstype} {r.source} at {r.where} ({','.join(r.options)})\n"
            )
    return _exit_code(reporter)


def reset_overlay(
    root: str = "/", config: str | None = None, cmdline: str = DEFAULT_CMDLINE
) -> int:
    """Wipe the /nix/store upper layer: now if the overlay is not mounted, else at next boot."""
    from guest_agent.commands import reset_command
    from guest_agent.report import Reporter

    reporter = Reporter()
    src = sources(root, config, cmdline)
    spec_config = load(src, reporter)
    held = lock()
    try:
        reset_command(src.root, spec_config, reporter)
    finally:
        if held is not None:
            os.close(held)
    return _exit_code(reporter)


def discover(as_json: bool = False, all_disks: bool = False) -> int:
    """List virtio shares (tag, protocol) and disks (serial, label, fstype)."""
    from guest_agent.commands import discover_all, render

    items, notes = discover_all(all_disks=all_disks)
    if as_json:
        _print_json(items)
    else:
        sys.stdout.write(render(items) + "\n")
    for note in notes:
        sys.stderr.write(f"note: {note}\n")
    return 0


def status(
    root: str = "/",
    config: str | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    as_json: bool = False,
) -> int:
    """Each configured mount and whether the kernel shows it as planned (1 if a required one is not)."""
    from guest_agent.commands import mount_status
    from guest_agent.report import Reporter

    reporter = Reporter(kmsg=None)
    src = sources(root, config, cmdline)
    spec_config = load(src, reporter)
    rows = mount_status(src.root, spec_config)
    if as_json:
        _print_json(rows)
    else:
        for row in rows:
            sys.stdout.write(f"{row['state']:<12} {row['where']:<24} {row['detail']}\n")
    unhealthy = any(row["state"] != "mounted" and row["required"] for row in rows)
    return 1 if _exit_code(reporter) or unhealthy else 0

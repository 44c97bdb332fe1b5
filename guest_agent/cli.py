"""The command-line edge: load specs, run the layers, turn problems into exit codes.

Exit status: 0 when everything required is mounted, 1 when a required mount
failed or a spec was malformed, 2 for bad command usage (click's own).
Heavy or kernel-facing modules are imported inside the command that needs them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from guest_agent.config import DEFAULT_CMDLINE, DEFAULT_CONFIG

F = TypeVar("F", bound=Callable[..., Any])
LOCK_PATHS = ("/run/guest-agent.lock", "/tmp/guest-agent.lock")
LOCK_TIMEOUT = 120


@dataclass(frozen=True)
class Sources:
    root: str
    config: str
    config_given: bool
    cmdline: str


def _common(func: F) -> F:
    func = click.option(
        "--cmdline",
        "cmdline",
        default=DEFAULT_CMDLINE,
        show_default=True,
        metavar="FILE",
        help="Kernel command line to read microvm.* keys from.",
    )(func)
    func = click.option(
        "--config",
        "config",
        default=None,
        metavar="FILE",
        help=f"JSON config file [default: {DEFAULT_CONFIG} when present].",
    )(func)
    func = click.option(
        "--root",
        default="/",
        show_default=True,
        type=click.Path(exists=True, file_okay=False),
        help="Target root: every mount point is inside it.",
    )(func)
    return func


def _sources(root: str, config: str | None, cmdline: str) -> Sources:
    return Sources(os.path.realpath(root), config or DEFAULT_CONFIG, config is not None, cmdline)


def _load(sources: Sources, reporter: Any) -> Any:
    """Read and merge the config file and the command line; report their problems."""
    from guest_agent.config import Parsed, merge, parse_cmdline, parse_config_json
    from guest_agent.spec import Problem

    layers: list[Parsed] = []
    text = _read(sources.config)
    if text is not None:
        layers.append(parse_config_json(text, sources.config))
    elif sources.config_given:
        layers.append(Parsed(problems=(Problem(sources.config, "cannot read the config file"),)))
    cmdline = _read(sources.cmdline)
    if cmdline is None:
        layers.append(Parsed(problems=(Problem(sources.cmdline, "cannot read the command line"),)))
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


def _lock(timeout: int = LOCK_TIMEOUT) -> int | None:
    """Serialise runs (two at once must not mount twice): an exclusive flock, held until exit.

    A run that waits longer than TIMEOUT seconds for another one gives up with a
    usage-level error instead of hanging the boot.
    """
    import fcntl
    import signal

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
            click.echo(f"error: another guest-agent run has held {path} for {timeout} s", err=True)
            sys.exit(1)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        return fd
    return None


def _finish(reporter: Any, payload: Any | None, as_json: bool) -> None:
    if as_json and payload is not None:
        click.echo(json.dumps(payload, indent=2))
    reporter.close()
    sys.exit(1 if reporter.failed else 0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, name="guest-agent")
@click.version_option(package_name="guest-agent", message="%(prog)s %(version)s")
def main() -> None:
    """Mount a microVM guest's virtio shares, volumes and /nix/store overlay."""


def run() -> None:
    """Console entry point. The last line of defence of "never a traceback": an unforeseen
    error still gives one line and exit 1 (GUEST_AGENT_DEBUG=1 shows the traceback)."""
    try:
        main(prog_name="guest-agent")
    except Exception as e:
        if os.environ.get("GUEST_AGENT_DEBUG"):
            raise
        click.echo(f"error: guest-agent failed unexpectedly: {type(e).__name__}: {e}", err=True)
        sys.exit(1)


@main.command("mount-all")
@_common
@click.option("--dry-run", is_flag=True, help="Print the plan; touch nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def mount_all(root: str, config: str | None, cmdline: str, dry_run: bool, as_json: bool) -> None:
    """Discover, plan and mount everything; build the overlay; apply a pending reset."""
    from guest_agent.execute import Executor
    from guest_agent.plan import plan
    from guest_agent.report import Reporter

    reporter = Reporter(kmsg=None if dry_run else "/dev/kmsg")
    sources = _sources(root, config, cmdline)
    spec_config = _load(sources, reporter)
    steps, problems = plan(spec_config)
    for problem in problems:
        reporter.problem(problem)
    lock = None if dry_run else _lock()
    executor = Executor(
        sources.root, reporter, dry_run=dry_run, reset_requested=spec_config.reset_overlay
    )
    try:
        results = executor.run(steps)
    finally:
        executor.close()
        if lock is not None:
            os.close(lock)
    if dry_run and not as_json:
        for r in results:
            click.echo(f"{r.status} {r.fstype} {r.source} at {r.where} ({','.join(r.options)})")
    _finish(
        reporter,
        {
            "ok": not reporter.failed,
            "mounts": [r.as_json() for r in results],
            "problems": [str(p) for p in reporter.problems],
        },
        as_json,
    )


@main.command("reset-overlay")
@_common
def reset_overlay(root: str, config: str | None, cmdline: str) -> None:
    """Wipe the /nix/store upper layer: now if the overlay is not mounted, else at next boot."""
    from guest_agent.commands import reset_command
    from guest_agent.report import Reporter

    reporter = Reporter()
    sources = _sources(root, config, cmdline)
    spec_config = _load(sources, reporter)
    lock = _lock()
    try:
        reset_command(sources.root, spec_config, reporter)
    finally:
        if lock is not None:
            os.close(lock)
    _finish(reporter, None, False)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list on stdout.")
@click.option("--all", "all_disks", is_flag=True, help="Also list disks that are not virtio.")
def discover(as_json: bool, all_disks: bool) -> None:
    """List virtio shares (tag, protocol) and disks (serial, label, fstype)."""
    from guest_agent.commands import discover_all, render

    items, notes = discover_all(all_disks=all_disks)
    if as_json:
        click.echo(json.dumps(items, indent=2))
    else:
        click.echo(render(items))
    for note in notes:
        click.echo(f"note: {note}", err=True)


@main.command()
@_common
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list on stdout.")
def status(root: str, config: str | None, cmdline: str, as_json: bool) -> None:
    """Each configured mount and whether the kernel shows it as planned."""
    from guest_agent.commands import mount_status
    from guest_agent.report import Reporter

    reporter = Reporter(kmsg=None)
    sources = _sources(root, config, cmdline)
    spec_config = _load(sources, reporter)
    rows = mount_status(sources.root, spec_config)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for row in rows:
            click.echo(f"{row['state']:<12} {row['where']:<24} {row['detail']}")
    reporter.close()
    unhealthy = any(row["state"] != "mounted" and row["required"] for row in rows)
    sys.exit(1 if reporter.failed or unhealthy else 0)

"""The click command-line interface: options, help and usage errors (exit 2).

Thin: every command calls its body in `guest_agent.cli` and exits with its
status. The boot path (`guest-agent mount-all` with plain options) does not even
import this module: see `main`, the layer above, which this one never imports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from guest_agent.config.merge import DEFAULT_CMDLINE, DEFAULT_CONFIG

F = TypeVar("F", bound=Callable[..., Any])

REFERENCE = "docs/reference.md"  # the one reference page: every word, output and exit code
# One example per command, shown at the end of its --help (click's epilog).
EXAMPLES = {
    "mount-all": "guest-agent mount-all --dry-run --root /sysroot",
    "reset-overlay": "guest-agent reset-overlay",
    "status": "guest-agent status --json",
    "discover": "guest-agent discover --no-load",
}


def _epilog(command: str) -> str:
    # \b keeps click from rewrapping the paragraph.
    return (
        f"\b\nExample:\n  {EXAMPLES[command]}\n\n"
        f"Exit codes, --json fields and every option word: {REFERENCE} "
        f'("Commands", "JSON output").'
    )


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, name="guest-agent")
@click.version_option(package_name="guest-agent", message="%(prog)s %(version)s")
def main() -> None:
    """Mount a microVM guest's virtio shares, volumes and /nix/store overlay."""


@main.command("mount-all", epilog=_epilog("mount-all"))
@_common
@click.option("--dry-run", is_flag=True, help="Print the plan; touch nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def mount_all(root: str, config: str | None, cmdline: str, dry_run: bool, as_json: bool) -> None:
    """Discover, plan and mount everything; build the overlay; apply a pending reset."""
    from guest_agent.cli.mount_all import mount_all

    sys.exit(mount_all(root, config, cmdline, dry_run, as_json))


@main.command("reset-overlay", epilog=_epilog("reset-overlay"))
@_common
def reset_overlay(root: str, config: str | None, cmdline: str) -> None:
    """Wipe the /nix/store upper layer: now if the overlay is not mounted, else at next boot."""
    from guest_agent.cli.reset_overlay import reset_overlay

    sys.exit(reset_overlay(root, config, cmdline))


@main.command(epilog=_epilog("discover"))
@click.option("--json", "as_json", is_flag=True, help="Print the devices as JSON on stdout.")
@click.option("--all", "all_disks", is_flag=True, help="Also list disks that are not virtio.")
@click.option(
    "--no-load", "no_load", is_flag=True, help="Load no kernel module: list what is bound now."
)
def discover(as_json: bool, all_disks: bool, no_load: bool) -> None:
    """List virtio shares (tag, protocol) and disks (serial, label, fstype).

    First loads the kernel modules of driverless virtio devices, as mount-all does
    (it says so when it loads any); --no-load lists without loading."""
    from guest_agent.cli.discover import discover

    sys.exit(discover(as_json, all_disks, load=not no_load))


@main.command(epilog=_epilog("status"))
@_common
@click.option("--json", "as_json", is_flag=True, help="Print the mounts as JSON on stdout.")
def status(root: str, config: str | None, cmdline: str, as_json: bool) -> None:
    """Each configured mount and whether the kernel shows it as planned."""
    from guest_agent.cli.status import status

    sys.exit(status(root, config, cmdline, as_json))

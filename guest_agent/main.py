"""Console entry point.

`guest-agent mount-all` runs on every boot, often in an emulated guest where
each import is paid many times over, so its plain forms (the options of the
contract, nothing else) are parsed here without importing click. Everything
else — help, other commands, any argument this parser does not know — goes to
the click CLI, which also owns usage errors (exit 2).

Layers, each importing only the next: main -> cli (click) -> commands.
"""

from __future__ import annotations

import os
import sys

_VALUE_OPTIONS = {"--root": "root", "--config": "config", "--cmdline": "cmdline"}
_FLAG_OPTIONS = {"--dry-run": "dry_run", "--json": "as_json"}


def parse_mount_all(args: list[str]) -> dict[str, str | bool] | None:
    """Options of `mount-all ARGS`, or None when click should handle them."""
    options: dict[str, str | bool] = {}
    items = iter(args)
    for arg in items:
        name, eq, value = arg.partition("=")
        if name in _VALUE_OPTIONS:
            if not eq:
                value = next(items, "")
            if not value or value.startswith("-"):
                return None
            options[_VALUE_OPTIONS[name]] = value
        elif arg in _FLAG_OPTIONS:
            options[_FLAG_OPTIONS[arg]] = True
        else:
            return None
    root = options.get("root", "/")
    if not (isinstance(root, str) and os.path.isdir(root)):
        return None  # click reports the bad --root as a usage error
    return options


def run() -> None:
    """The last line of defence of "never a traceback": an unforeseen error still
    gives one line and exit 1 (GUEST_AGENT_DEBUG=1 shows the traceback)."""
    try:
        args = sys.argv[1:]
        fast = parse_mount_all(args[1:]) if args[:1] == ["mount-all"] else None
        if fast is not None:
            # A boot's run is short and makes next to no reference cycles (reference counting
            # frees the rest): the cyclic collector's passes over the freshly imported modules
            # are ~3 % of it in an emulated guest (bench/compare.py --profile), so skip them.
            import gc

            gc.disable()
            from guest_agent.cli.mount_all import mount_all

            sys.exit(mount_all(**fast))  # type: ignore[arg-type]
        from guest_agent.cli.app import main

        main(prog_name="guest-agent")
    except Exception as e:
        if os.environ.get("GUEST_AGENT_DEBUG"):
            raise
        line = f"error: guest-agent failed unexpectedly: {type(e).__name__}: {e}"
        sys.stderr.write(line.encode("utf-8", "backslashreplace").decode() + "\n")
        sys.exit(1)

"""The commands' bodies, free of click: read the inputs, run the layers, return exit codes.

One module per command (`mount_all`, `reset_overlay`, `status`, `discover`), each
imported only by the command that runs it, so that the boot path (`mount-all`)
pays for nothing else. Exit status: 0 when everything required is mounted, 1 when
a required mount failed or a spec was malformed (2, bad usage, is the CLI's).
Problems are values (`Problem`) until here, where they become lines and exit codes.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

    from guest_agent.report import Reporter


def print_json(payload: Any) -> None:
    import json

    sys.stdout.write(json.dumps(payload, indent=2) + "\n")  # ASCII: \uXXXX escapes
    sys.stdout.flush()


def write(text: str) -> None:
    """Write TEXT on stdout, never failing on a path's undecodable bytes."""
    from guest_agent.report import printable

    sys.stdout.write(printable(text))


def exit_code(reporter: Reporter) -> int:
    reporter.close()
    return 1 if reporter.failed else 0

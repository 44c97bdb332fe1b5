"""The commands' bodies, free of click: read the inputs, run the layers, return exit codes.

One module per command (`mount_all`, `reset_overlay`, `status`, `discover`), each
imported only by the command that runs it, so that the boot path (`mount-all`)
pays for nothing else. Each module declares its exit codes (`EXIT_CODES`, read by
docs/reference.md's test); 2, bad usage, is the CLI's for every command.
Problems are values (`Problem`) until here, where they become lines and exit codes.

`--json` has one shape for every command: `{"version": 1, "ok": …, LIST: […],
"problems": [{"spec", "reason", "hint", "fatal"}]}`, LIST being "mounts" or "devices".
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from guest_agent.report import Reporter
    from guest_agent.spec import Problem

JSON_VERSION = 1  # bumped only when a field changes meaning or goes away
# The top-level keys of every --json output, in order; "LIST" is the command's list key.
JSON_KEYS = ("version", "ok", "LIST", "problems")
PROBLEM_FIELDS = ("spec", "reason", "hint", "fatal")  # spec.Problem's fields
USAGE_EXIT = 2  # click's, for every command: an unknown option, a missing value…
USAGE = "bad usage: an unknown option or command, a missing value, a --root that is no directory"


def problem_json(problem: Problem) -> dict[str, Any]:
    return {
        "spec": problem.spec,
        "reason": problem.reason,
        "hint": problem.hint,
        "fatal": problem.fatal,
    }


def json_output(
    ok: bool, key: str, items: Iterable[dict[str, Any]], problems: Iterable[Problem]
) -> dict[str, Any]:
    """The one --json shape (JSON_KEYS), KEY naming the command's list."""
    return {
        "version": JSON_VERSION,
        "ok": ok,
        key: list(items),
        "problems": [problem_json(p) for p in problems],
    }


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

"""The commands' bodies, free of click: read the inputs, run the layers, return exit codes.

One module per command (`mount_all`, `reset_overlay`, `status`, `discover`), each
imported only by the command that runs it, so that the boot path (`mount-all`)
pays for nothing else. Each module declares its exit codes (`EXIT_CODES`, read by
docs/reference.md's test); 2, bad usage, is the CLI's for every command.
Problems are values (`Problem`) until here, where they become lines and exit codes.

`--json` has one shape for every command: `{"version": 1, "ok": …, LIST: […],
"problems": [{"spec", "reason", "hint", "fatal"}]}`, LIST being "mounts" or "devices".

The boot record is here too (not in a module of its own: every boot writes it, and
an import costs an emulated guest more than the writing): `mount-all` writes its
--json object and its run to /run/guest-agent/boot.json, atomically (a new file
renamed over the old); initramfs-tools, dracut and NixOS's stage 1 carry the
initrd's /run into the real root, where `status` reads it. `summary` makes the
sd_notify fields the host hears (guest_agent.vmm_notify escapes them).
"""

from __future__ import annotations

import os
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


# --- the boot record ---------------------------------------------------------------

RECORD_DIR = "/run/guest-agent"  # GUEST_AGENT_RECORD_DIR names another (the tests)
RECORD_NAME = "boot.json"
RECORD_VERSION = JSON_VERSION  # the record is mount-all's --json output plus its run:
RECORD_FIELDS = ("version", "ok", "mounts", "problems", "started", "finished", "exit_status")


def record_dir() -> str:
    return os.environ.get("GUEST_AGENT_RECORD_DIR", RECORD_DIR)


def write_record(payload: dict[str, Any], directory: str = RECORD_DIR) -> str | None:
    """Write PAYLOAD as DIRECTORY/boot.json; None when written, else why not."""
    data = (dumps(payload) + "\n").encode()
    try:
        try:
            os.mkdir(directory, 0o755)  # its parent, /run, is there
        except FileExistsError:
            pass
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {directory}: {os.strerror(e.errno or 0)}"
    temp = f".{RECORD_NAME}.{os.getpid()}"
    try:
        fd = os.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=dir_fd,
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(temp, RECORD_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return None
    except OSError as e:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        return f"cannot write {directory}/{RECORD_NAME}: {os.strerror(e.errno or 0)}"
    finally:
        os.close(dir_fd)


def dumps(value: object) -> str:
    """VALUE as JSON text, ASCII only (as `json.dumps`'s default). Not `json`: on the boot
    path its import (with `re` and `enum`, and the patterns it compiles) costs about
    200 ms of an emulated guest's instructions, more than everything else here."""
    if isinstance(value, str):
        return _string(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int | float):
        return repr(value) if value == value and value not in (_INF, -_INF) else "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    raise TypeError(f"{type(value).__name__} is not JSON")


_INF = float("inf")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _string(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'  # the usual case, at C speed
    out = []
    for c in text:
        code = ord(c)
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif 0x20 <= code < 0x7F:
            out.append(c)
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:  # a UTF-16 surrogate pair, as JSON spells what is beyond the BMP
            code -= 0x10000
            out.append(f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}")
    return '"' + "".join(out) + '"'


def read_record(directory: str = RECORD_DIR) -> dict[str, Any] | None:
    """The last boot's record, or None when there is none (or it is not one)."""
    import json

    try:
        fd = os.open(
            os.path.join(directory, RECORD_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            record = json.loads(f.read(1 << 22))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("version") == RECORD_VERSION else None


def summary(
    mounts: list[dict[str, Any]], problems: list[dict[str, Any]]
) -> tuple[str, list[tuple[str, str]]]:
    """The one line a person reads in `systemctl status` (STATUS=) and the
    machine-readable X_GUEST_AGENT_* fields, from the record's mounts and problems."""
    counts: dict[str, int] = {}
    for m in mounts:
        counts[m.get("status", "?")] = counts.get(m.get("status", "?"), 0) + 1
    fatal = [p for p in problems if p.get("fatal")]
    parts = [f"{n} {status}" for status, n in sorted(counts.items())] or ["nothing to mount"]
    line = "guest-agent: " + ", ".join(parts)
    if fatal:
        first = fatal[0]
        line += f"; {len(fatal)} failed: {first.get('spec')}: {first.get('reason')}"
    warnings = len(problems) - len(fatal)
    fields = [
        ("X_GUEST_AGENT_RESULT", "failed" if fatal else "ok"),
        *(
            (f"X_GUEST_AGENT_{status.upper().replace('-', '_')}", str(n))
            for status, n in sorted(counts.items())
        ),
        ("X_GUEST_AGENT_ERRORS", str(len(fatal))),
        ("X_GUEST_AGENT_WARNINGS", str(warnings)),
        *(
            (f"X_GUEST_AGENT_ERROR_{i}", f"{p.get('spec')}: {p.get('reason')}")
            for i, p in enumerate(fatal, 1)
        ),
    ]
    return line, fields

"""The boot record read back; its general JSON writer.

`mount-all` writes /run/guest-agent/boot.json on the boot path itself
(`commands.mount_all.record_text`, `commands.write_record`): one f-string per mount
when every string it quotes is plain ASCII, else `dumps` here. What is not on a
boot's path is here: `read_record` for `status`, and `dumps`. (`summary`, the line
and the fields the host hears and `status` shows, is guest_agent.vmm_notify's.)
"""

from __future__ import annotations

import os

from guest_agent.cli import JSON_VERSION, RECORD_DIR, RECORD_NAME, json_output

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

    from guest_agent.results import Result
    from guest_agent.spec import Problem

RECORD_VERSION = JSON_VERSION  # the record is mount-all's --json output plus its run:
RECORD_FIELDS = ("version", "ok", "mounts", "problems", "started", "finished", "exit_status")


def record_json(
    results: list[Result], problems: list[Problem], started: float, finished: float, status: int
) -> str:
    """What mount_all.record_text writes, for values it does not write as they are."""
    payload = json_output(not status, "mounts", [r.as_json() for r in results], problems)
    run = {"started": round(started, 3), "finished": round(finished, 3), "exit_status": status}
    return dumps({**payload, **run}) + "\n"


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

"""Progress and problems: one line each on stderr and in the kernel log (`dmesg`), each
line once in the journal.

The kernel log: every line becomes a record written to /dev/kmsg as `<LEVEL>guest-agent:
LINE`. The kernel rate-limits those writes per open file (devkmsg_write: 10 records per
5 s, the state made by devkmsg_open, unless `printk.devkmsg=on`) and drops the rest
without an error, so a file is opened afresh for every few records, never written more
than _RECORDS_PER_OPEN times. With `printk.devkmsg=off` the kernel refuses the open
(EPERM): the lines are on stderr only. A record holds at most _RECORD_MAX bytes (6.1
refuses a write over 992 with EINVAL): a longer line is cut into several, each after the
first starting with `...`.

The journal: when stderr is the journal (a systemd unit's StandardError=journal, which
`JOURNAL_STREAM` names), journald also reads /dev/kmsg into the journal (the identifier
`guest-agent` parsed from the record), so the line goes to /dev/kmsg only; to stderr when
the kernel log could not take it.
"""

from __future__ import annotations

import os
import sys
from _thread import allocate_lock

from guest_agent.spec import Problem

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import TextIO

KMSG = "/dev/kmsg"
IDENTIFIER = "guest-agent"
_PREFIX = IDENTIFIER + ": "
_CONTINUED = "... "
# syslog levels for /dev/kmsg records
_INFO, _WARNING, _ERR = 6, 4, 3
#: Records written through one open /dev/kmsg before the next open: below the kernel's
#: burst of 10 (DEFAULT_RATELIMIT_BURST), whatever the interval.
_RECORDS_PER_OPEN = 8
#: Bytes of one write, `<N>guest-agent: ` and the newline included: the kernel's limit
#: less the 48 bytes a CONFIG_PRINTK_CALLER prefix takes (6.1: 1024 - 32 = 992; 6.12: 1024).
_RECORD_MAX = 1024 - 48


def printable(text: str) -> str:
    """TEXT with what cannot be written as UTF-8 spelled out: a path's undecodable byte
    0xff (surrogate-escaped, U+DCFF) and lone surrogates become `\\udcff`. Never raises."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether STREAM is connected to the journal: its device and inode are those
    `JOURNAL_STREAM` names ("DEV:INODE", systemd.exec(5))."""
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def kmsg_records(line: str, level: int) -> list[bytes]:
    """LINE as /dev/kmsg records of at most _RECORD_MAX bytes each, cut between
    characters; each after the first starts with `...`."""
    data = line.encode()
    records = []
    head = f"<{level}>{_PREFIX}".encode()
    while True:
        room = _RECORD_MAX - len(head) - 1
        cut = min(room, len(data))
        while cut < len(data) and data[cut] & 0xC0 == 0x80:  # not inside a character
            cut -= 1
        records.append(head + data[:cut] + b"\n")
        data = data[cut:]
        if not data:
            return records
        head = f"<{level}>{_PREFIX}{_CONTINUED}".encode()


class Reporter:
    def __init__(
        self,
        stream: TextIO | None = None,
        kmsg: str | None = KMSG,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.problems: list[Problem] = []
        self._kmsg_path = kmsg
        self._kmsg_fd: int | None = None
        self._kmsg_writes = 0  # through the open _kmsg_fd
        self._lock = allocate_lock()  # lines from several threads stay whole and in order
        self.stderr_is_journal = stream_is_journal(
            self.stream, os.environ if environ is None else environ
        )

    def info(self, message: str) -> None:
        self._emit(message, _INFO)

    def problem(self, problem: Problem) -> None:
        self.problems.append(problem)
        if problem.fatal:
            self._emit(f"error: {problem}", _ERR)
        else:
            self._emit(f"warning: {problem}", _WARNING)

    @property
    def failed(self) -> bool:
        return any(p.fatal for p in self.problems)

    def _emit(self, line: str, level: int) -> None:
        line = printable(" ".join(line.split("\n")))
        with self._lock:
            logged = self._to_kmsg(line, level)
            if logged and self.stderr_is_journal:
                return  # journald reads it from the kernel log: once in the journal
            self.stream.write(line + "\n")
            self.stream.flush()

    def _to_kmsg(self, line: str, level: int) -> bool:
        """Write LINE to the kernel log; False when it could not take all of it."""
        for record in kmsg_records(line, level):
            fd = self._kmsg()
            if fd is None:
                return False
            try:
                os.write(fd, record)
            except OSError:
                return False
            self._kmsg_writes += 1
        return True

    def _kmsg(self) -> int | None:
        """An open /dev/kmsg with writes left below the kernel's rate limit."""
        if self._kmsg_fd is not None and self._kmsg_writes >= _RECORDS_PER_OPEN:
            self.close()
        if self._kmsg_path is None:
            return None
        if self._kmsg_fd is None:
            try:
                self._kmsg_fd = os.open(self._kmsg_path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError:
                self._kmsg_path = None  # not writable (printk.devkmsg=off: EPERM): stderr only
                return None
            self._kmsg_writes = 0
        return self._kmsg_fd

    def close(self) -> None:
        if self._kmsg_fd is not None:
            os.close(self._kmsg_fd)
            self._kmsg_fd = None

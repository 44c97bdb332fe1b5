"""Progress and problems: one line each on stderr, mirrored to /dev/kmsg for dmesg and the journal."""

from __future__ import annotations

import os
import sys

from guest_agent.spec import Problem

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import TextIO

KMSG = "/dev/kmsg"
_PREFIX = "guest-agent: "
# syslog levels for /dev/kmsg records
_INFO, _WARNING, _ERR = 6, 4, 3


def printable(text: str) -> str:
    """TEXT with what cannot be written as UTF-8 spelled out: a path's undecodable byte
    0xff (surrogate-escaped, U+DCFF) and lone surrogates become `\\udcff`. Never raises."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Reporter:
    def __init__(self, stream: TextIO | None = None, kmsg: str | None = KMSG) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.problems: list[Problem] = []
        self._kmsg_path = kmsg
        self._kmsg_fd: int | None = None

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
        self.stream.write(line + "\n")
        self.stream.flush()
        fd = self._kmsg()
        if fd is not None:
            try:
                os.write(fd, f"<{level}>{_PREFIX}{line}\n".encode()[:1000])
            except OSError:
                pass

    def _kmsg(self) -> int | None:
        if self._kmsg_path is None:
            return None
        if self._kmsg_fd is None:
            try:
                self._kmsg_fd = os.open(self._kmsg_path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError:
                self._kmsg_path = None  # not writable: stderr only
                return None
        return self._kmsg_fd

    def close(self) -> None:
        if self._kmsg_fd is not None:
            os.close(self._kmsg_fd)
            self._kmsg_fd = None

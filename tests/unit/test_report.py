"""The Reporter: every line in the kernel log despite its rate limit, once in the journal.

The kernel side is faked two ways: a FIFO standing in for /dev/kmsg (the records as
written, byte for byte), and `FakeKmsg`, which stands in for os.open/os.write/os.close
and keeps what the kernel keeps: devkmsg_write lets 10 records through one open file
per 5 s (DEFAULT_RATELIMIT_BURST) and drops the rest without an error. The real kernels
are in tests/vm/test_kernel_log.py.
"""

from __future__ import annotations

import errno
import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from guest_agent import report
from guest_agent.report import Reporter, kmsg_records, stream_is_journal
from guest_agent.spec import Problem

KERNEL_BURST = 10  # DEFAULT_RATELIMIT_BURST: records per open file and 5 s


class FakeKmsg:
    """/dev/kmsg as the kernel treats writes: per open file, the first KERNEL_BURST
    records are logged, the others dropped (the write still returns its length)."""

    PATH = "/fake/kmsg"

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse: int | None = None) -> None:
        self.log: list[bytes] = []
        self.dropped = 0
        self.opens = 0
        self.refuse = refuse  # errno of every open, as printk.devkmsg=off gives EPERM
        self.written: dict[int, int] = {}  # fd -> records written through it
        self._next_fd = 1000
        real_open, real_write, real_close = os.open, os.write, os.close

        def fake_open(path: Any, flags: int, *a: Any, **kw: Any) -> int:
            if path != self.PATH:
                return real_open(path, flags, *a, **kw)
            if self.refuse is not None:
                raise OSError(self.refuse, os.strerror(self.refuse), path)
            assert flags & os.O_ACCMODE == os.O_WRONLY
            self.opens += 1
            self._next_fd += 1
            self.written[self._next_fd] = 0
            return self._next_fd

        def fake_write(fd: int, data: bytes) -> int:
            if fd not in self.written:
                return real_write(fd, data)
            assert len(data) <= 992, len(data)  # 6.1's limit (LOG_LINE_MAX), else EINVAL
            self.written[fd] += 1
            if self.written[fd] <= KERNEL_BURST:
                self.log.append(bytes(data))
            else:
                self.dropped += 1
            return len(data)

        def fake_close(fd: int) -> None:
            if fd in self.written:
                del self.written[fd]
                return
            real_close(fd)

        monkeypatch.setattr(report.os, "open", fake_open)
        monkeypatch.setattr(report.os, "write", fake_write)
        monkeypatch.setattr(report.os, "close", fake_close)


def test_every_line_of_a_busy_boot_passes_the_kernels_rate_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kmsg = FakeKmsg(monkeypatch)
    stream = io.StringIO()
    reporter = Reporter(stream, kmsg=FakeKmsg.PATH, environ={})
    for i in range(60):
        reporter.info(f"mounted tmpfs at /m/{i}")
    reporter.problem(Problem("microvm.volume=x", "bad"))
    reporter.close()
    expected = [f"mounted tmpfs at /m/{i}" for i in range(60)] + ["error: microvm.volume=x: bad"]
    assert stream.getvalue().splitlines() == expected
    assert kmsg.dropped == 0
    assert [r.decode() for r in kmsg.log] == [
        *(f"<6>guest-agent: {line}\n" for line in expected[:-1]),
        "<3>guest-agent: error: microvm.volume=x: bad\n",
    ]
    assert kmsg.opens == 8  # 61 records, 8 per open: an open per burst, not per line
    assert kmsg.written == {}  # all closed


def test_records_through_a_fifo_are_the_lines_in_order(tmp_path: Path) -> None:
    fifo = tmp_path / "kmsg"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        stream = io.StringIO()
        reporter = Reporter(stream, kmsg=str(fifo), environ={})
        for i in range(25):
            reporter.problem(Problem(f"spec {i}", "not mounted", fatal=i % 2 == 0))
        reporter.close()
        data = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    lines = [f"{'error' if i % 2 == 0 else 'warning'}: spec {i}: not mounted" for i in range(25)]
    assert stream.getvalue().splitlines() == lines
    levels = ["<3>" if i % 2 == 0 else "<4>" for i in range(25)]
    assert data.decode().splitlines() == [
        f"{level}guest-agent: {line}" for level, line in zip(levels, lines, strict=True)
    ]


def test_a_long_line_is_cut_into_records_the_kernel_takes() -> None:
    line = "mounted at /" + "é" * 700 + "x" * 900  # 2 312 bytes in UTF-8
    records = kmsg_records(line, 6)
    assert len(records) == 3
    assert all(len(r) <= 1024 - 48 for r in records)
    texts = [r.decode() for r in records]  # each whole UTF-8: no character cut in two
    assert texts[0].startswith("<6>guest-agent: mounted at /é")
    assert all(t.startswith("<6>guest-agent: ... ") for t in texts[1:])
    assert all(t.endswith("\n") and t.count("\n") == 1 for t in texts)
    head, cont = len("<6>guest-agent: "), len("<6>guest-agent: ... ")
    rebuilt = texts[0][head:-1] + "".join(t[cont:-1] for t in texts[1:])
    assert rebuilt == line
    assert kmsg_records("short", 3) == [b"<3>guest-agent: short\n"]


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.ENOENT, errno.EACCES])
def test_kmsg_refused_means_stderr_only(monkeypatch: pytest.MonkeyPatch, refusal: int) -> None:
    """printk.devkmsg=off: devkmsg_open returns EPERM; no /dev in a chroot: ENOENT."""
    kmsg = FakeKmsg(monkeypatch, refuse=refusal)
    stream = io.StringIO()
    reporter = Reporter(stream, kmsg=FakeKmsg.PATH, environ={})
    reporter.info("one")
    reporter.info("two")
    reporter.close()
    assert stream.getvalue() == "one\ntwo\n"
    assert kmsg.log == [] and kmsg.opens == 0


def journal_env(path: Path) -> dict[str, str]:
    st = path.stat()
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_stderr_that_is_the_journal_gets_nothing_kmsg_everything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """journald reads /dev/kmsg into the journal: writing stderr too would log each
    line twice."""
    kmsg = FakeKmsg(monkeypatch)
    journal = tmp_path / "journal-stream"
    with journal.open("w") as stream:
        reporter = Reporter(stream, kmsg=FakeKmsg.PATH, environ=journal_env(journal))
        assert reporter.stderr_is_journal
        for i in range(20):
            reporter.info(f"line {i}")
        reporter.close()
    assert journal.read_text() == ""
    assert [r.decode() for r in kmsg.log] == [f"<6>guest-agent: line {i}\n" for i in range(20)]


def test_stderr_that_is_the_journal_gets_the_lines_when_kmsg_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    FakeKmsg(monkeypatch, refuse=errno.EPERM)
    journal = tmp_path / "journal-stream"
    with journal.open("w") as stream:
        reporter = Reporter(stream, kmsg=FakeKmsg.PATH, environ=journal_env(journal))
        reporter.info("mounted tmpfs at /a")
        reporter.problem(Problem("/b", "bad"))
    assert journal.read_text() == "mounted tmpfs at /a\nerror: /b: bad\n"


def test_stderr_that_is_the_journal_gets_a_line_the_kernel_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kmsg = FakeKmsg(monkeypatch)
    real_write = report.os.write

    def write(fd: int, data: bytes) -> int:
        if b"refused" in data:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(report.os, "write", write)
    journal = tmp_path / "journal-stream"
    with journal.open("w") as stream:
        reporter = Reporter(stream, kmsg=FakeKmsg.PATH, environ=journal_env(journal))
        reporter.info("kept")
        reporter.info("refused")
        reporter.info("kept too")
        reporter.close()
    assert journal.read_text() == "refused\n"
    assert kmsg.log == [b"<6>guest-agent: kept\n", b"<6>guest-agent: kept too\n"]


@pytest.mark.parametrize(
    "value", ["", "1:2", "garbage", "12", ":", "-1:-1", "{dev}:{ino}x", "{dev}:{ino}:0"]
)
def test_journal_stream_naming_another_file_or_nothing(tmp_path: Path, value: str) -> None:
    """Only JOURNAL_STREAM naming stderr's own device and inode makes it the journal (a
    child of a unit whose stderr was redirected keeps the variable, not the journal)."""
    path = tmp_path / "stderr"
    path.touch()
    st_dev, st_ino = path.stat().st_dev, path.stat().st_ino
    with path.open("w") as stream:
        env = {"JOURNAL_STREAM": value.format(dev=st_dev, ino=st_ino)}
        assert not stream_is_journal(stream, env)
        assert stream_is_journal(stream, {"JOURNAL_STREAM": f"{st_dev}:{st_ino}"})
        other = tmp_path / "other"
        other.touch()
        assert not stream_is_journal(stream, journal_env(other))
    assert not stream_is_journal(io.StringIO(), journal_env(path))  # no fd: not the journal


def test_os_environ_is_read_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", journal_env(path)["JOURNAL_STREAM"])
    with path.open("w") as stream:
        assert Reporter(stream, kmsg=None).stderr_is_journal
    monkeypatch.delenv("JOURNAL_STREAM")
    with path.open("w") as stream:
        assert not Reporter(stream, kmsg=None).stderr_is_journal


def test_lines_from_threads_all_arrive_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    kmsg = FakeKmsg(monkeypatch)
    stream = io.StringIO()
    reporter = Reporter(stream, kmsg=FakeKmsg.PATH, environ={})

    def work(t: int) -> None:
        for i in range(30):
            reporter.info(f"thread {t} line {i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    reporter.close()
    assert kmsg.dropped == 0
    records = sorted(r.decode() for r in kmsg.log)
    assert records == sorted(
        f"<6>guest-agent: thread {t} line {i}\n" for t in range(4) for i in range(30)
    )
    assert sorted(stream.getvalue().splitlines()) == sorted(r[16:-1] for r in records)

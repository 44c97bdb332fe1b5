"""The commands' bodies, free of click: load specs, run the layers, return exit codes.

Exit status: 0 when everything required is mounted, 1 when a required mount
failed or a spec was malformed. (2, bad usage, is the CLI's.) Kernel-facing
modules are imported inside the command that needs them, so that the boot
path (`mount-all`) pays for nothing else.
"""

from __future__ import annotations

import os
import sys

from guest_agent.config import DEFAULT_CMDLINE, DEFAULT_CONFIG
from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from typing import Any

    from guest_agent.report import Reporter
    from guest_agent.spec import Config

LOCK_TIMEOUT = 120
CONFIG_LIMIT = 4 << 20  # bytes: inputs larger than this are refused, never read whole
CMDLINE_LIMIT = 64 << 10


class Sources(NamedTuple):
    root: str  # real path of the target root
    config: str
    config_given: bool
    cmdline: str


def sources(root: str = "/", config: str | None = None, cmdline: str = DEFAULT_CMDLINE) -> Sources:
    return Sources(os.path.realpath(root), config or DEFAULT_CONFIG, config is not None, cmdline)


def load(src: Sources, reporter: Reporter) -> Config:
    """Read and merge the config file and the command line; report their problems."""
    from guest_agent.config import Parsed, merge, parse_cmdline, parse_config_json
    from guest_agent.spec import Problem

    layers: list[Parsed] = []
    data, why = _read(src.config, CONFIG_LIMIT)
    if data is not None:
        try:
            layers.append(parse_config_json(data.decode(), src.config))
        except UnicodeDecodeError as e:  # RFC 8259: JSON text is UTF-8
            reason = f"not valid JSON: not UTF-8 (byte {e.start})"
            layers.append(Parsed(problems=(Problem(src.config, reason),)))
    elif why is not None or src.config_given:  # a missing default file is no error
        reason = "cannot read the config file" + (f": {why}" if why else "")
        layers.append(Parsed(problems=(Problem(src.config, reason),)))
    data, why = _read(src.cmdline, CMDLINE_LIMIT)
    if data is None:
        reason = "cannot read the command line" + (f": {why}" if why else "")
        layers.append(Parsed(problems=(Problem(src.cmdline, reason),)))
    else:
        layers.append(parse_cmdline(data.decode(errors="replace")))
    config, problems, notes = merge(layers)
    for problem in problems:
        reporter.problem(problem)
    for note in notes:
        reporter.info(note)
    return config


_KINDS = {0o040000: "a directory", 0o010000: "a FIFO", 0o020000: "a character device",
          0o060000: "a block device", 0o140000: "a socket"}  # fmt: skip
_DEV_NULL = (1, 3)  # major, minor of /dev/null: `--config /dev/null` means "no config"


def _read(path: str, limit: int) -> tuple[bytes | None, str | None]:
    """(contents, None) of a regular file of at most LIMIT bytes; else (None, why not).

    Why not is None when the file does not exist. The file is opened
    non-blocking and checked before reading, so a FIFO, a device or a directory
    is refused at once; at most LIMIT + 1 bytes are read, never trusting
    st_size (/proc/cmdline says 0). /dev/null reads as empty.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, e.strerror or str(e)
    try:
        st = os.fstat(fd)
        kind = st.st_mode & 0o170000
        if kind != 0o100000:  # S_IFREG
            if kind == 0o020000 and (os.major(st.st_rdev), os.minor(st.st_rdev)) == _DEV_NULL:
                return b"", None
            return None, f"it is {_KINDS.get(kind, 'not a regular file')}, not a regular file"
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            known = f"{st.st_size} bytes" if st.st_size > limit else f"more than {limit} bytes"
            return None, f"it is too large ({known}; the limit is {_size(limit)})"
        return b"".join(chunks), None
    except OSError as e:
        return None, e.strerror or str(e)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def lock_name(root: str) -> str:
    """The run lock of a target root: an abstract unix socket name keyed by the root's identity."""
    st = os.stat(root)
    return f"\0guest-agent/{st.st_dev}:{st.st_ino}"


class LockFailed(Exception):
    """The run lock could not be taken: the message says why (one line)."""


def lock(root: str, timeout: float | None = None) -> int:
    """Serialise runs on one root (two at once must not mount twice); return the lock's fd.

    The lock is an abstract AF_UNIX socket name (`@guest-agent/DEV:INO`, from the
    root's st_dev and st_ino): binding it needs no writable filesystem, only one
    process can hold it, and the kernel releases it when that process exits. A
    run waits for the holder up to TIMEOUT seconds (default LOCK_TIMEOUT), then gives up (LockFailed)
    instead of hanging the boot. It never runs unlocked: when the socket cannot
    even be made, that is LockFailed too. The fd is close-on-exec.
    """
    import _socket as socket  # the C module: `socket` imports enum, selectors...
    import errno
    import time

    timeout = LOCK_TIMEOUT if timeout is None else timeout
    try:
        name = lock_name(root)
    except OSError as e:
        raise LockFailed(f"cannot name the run lock of {root!r}: {e.strerror or e}") from None
    shown = "@" + name[1:]
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as e:
        raise LockFailed(f"cannot make the run lock {shown}: {e.strerror or e}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.bind(name)
            return int(sock.detach())
        except OSError as e:
            if e.errno not in (errno.EADDRINUSE, errno.EINTR):
                sock.close()
                raise LockFailed(f"cannot take the run lock {shown}: {e.strerror or e}") from None
        if time.monotonic() >= deadline:
            sock.close()
            raise LockFailed(f"another guest-agent run has held the lock {shown} for {timeout:g} s")
        time.sleep(0.03)


def _print_json(payload: Any) -> None:
    import json

    sys.stdout.write(json.dumps(payload, indent=2) + "\n")  # ASCII: \uXXXX escapes
    sys.stdout.flush()


def _write(text: str) -> None:
    """Write TEXT on stdout, never failing on a path's undecodable bytes."""
    from guest_agent.report import printable

    sys.stdout.write(printable(text))


def _exit_code(reporter: Reporter) -> int:
    reporter.close()
    return 1 if reporter.failed else 0


def mount_all(
    root: str = "/",
    config: str | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    dry_run: bool = False,
    as_json: bool = False,
) -> int:
    """Discover, plan and mount everything; build the overlay; apply a pending reset."""
    from guest_agent.execute import Executor
    from guest_agent.plan import plan
    from guest_agent.report import Reporter
    from guest_agent.spec import Problem

    reporter = Reporter(kmsg=None if dry_run else "/dev/kmsg")
    src = sources(root, config, cmdline)
    spec_config = load(src, reporter)
    steps, problems = plan(spec_config)
    for problem in problems:
        reporter.problem(problem)
    held = None
    if not dry_run:
        try:
            held = lock(src.root)
        except LockFailed as e:
            reporter.problem(Problem("guest-agent mount-all", str(e), "nothing was mounted"))
            if as_json:
                _print_json(
                    {"ok": False, "mounts": [], "problems": [str(p) for p in reporter.problems]}
                )
            return _exit_code(reporter)
    executor = Executor(
        src.root, reporter, dry_run=dry_run, reset_requested=spec_config.reset_overlay
    )
    try:
        results = executor.run(steps)
    finally:
        executor.close()
        if held is not None:
            os.close(held)
    if as_json:
        _print_json(
            {
                "ok": not reporter.failed,
                "mounts": [r.as_json() for r in results],
                "problems": [str(p) for p in reporter.problems],
            }
        )
    elif dry_run:
        for r in results:
            _write(f"{r.status} {r.fstype} {r.source} at {r.where} ({','.join(r.options)})\n")
    return _exit_code(reporter)


def reset_overlay(
    root: str = "/", config: str | None = None, cmdline: str = DEFAULT_CMDLINE
) -> int:
    """Wipe the /nix/store upper layer: now if the overlay is not mounted, else at next boot."""
    from guest_agent.commands import reset_command
    from guest_agent.report import Reporter
    from guest_agent.spec import Problem

    reporter = Reporter()
    src = sources(root, config, cmdline)
    spec_config = load(src, reporter)
    try:
        held = lock(src.root)
    except LockFailed as e:
        reporter.problem(Problem("guest-agent reset-overlay", str(e), "nothing was reset"))
        return _exit_code(reporter)
    try:
        reset_command(src.root, spec_config, reporter)
    finally:
        os.close(held)
    return _exit_code(reporter)


def discover(as_json: bool = False, all_disks: bool = False) -> int:
    """List virtio shares (tag, protocol) and disks (serial, label, fstype)."""
    from guest_agent.commands import discover_all, render
    from guest_agent.report import printable

    items, notes = discover_all(all_disks=all_disks)
    if as_json:
        _print_json(items)
    else:
        _write(render(items) + "\n")
    for note in notes:
        sys.stderr.write(printable(f"note: {note}\n"))
    return 0


def status(
    root: str = "/",
    config: str | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    as_json: bool = False,
) -> int:
    """Each configured mount and whether the kernel shows it as planned (1 if a required one is not)."""
    from guest_agent.commands import mount_status
    from guest_agent.report import Reporter

    reporter = Reporter(kmsg=None)
    src = sources(root, config, cmdline)
    spec_config = load(src, reporter)
    rows = mount_status(src.root, spec_config)
    if as_json:
        _print_json(rows)
    else:
        for row in rows:
            _write(f"{row['state']:<12} {row['where']:<24} {row['detail']}\n")
    unhealthy = any(row["state"] != "mounted" and row["required"] for row in rows)
    return 1 if _exit_code(reporter) or unhealthy else 0

"""The edge: the commands, read the inputs, run the layers, return exit codes.

`app` is the click layer (help, usage errors; `main` sends it what it does not parse
itself). One module per command (`mount_all`, `reset_overlay`, `status`, `discover`), each
imported only by the command that runs it, so that the boot path (`mount-all`)
pays for nothing else. Each module declares its exit codes (`EXIT_CODES`, read by
docs/reference.md's test); 2, bad usage, is the CLI's for every command.
Problems are values (`Problem`) until here, where they become lines and exit codes.

`--json` has one shape for every command: `{"version": 1, "ok": …, LIST: […],
"problems": [{"spec", "reason", "hint", "fatal"}]}`, LIST being "mounts" or "devices".

The boot record's place and its writing are here too (every boot writes it): its
text is `mount_all.record_text`; `record` reads it back (for `status`) and escapes
what the plain path cannot. initramfs-tools, dracut and NixOS's stage 1 carry the
initrd's /run into the real root, where `status` reads it. So is the run lock
(`lock`): two runs on one target root must not mount the same things at once.

May import: config, plan, runner, handlers, devices, kmod, nixdb, reset, vmm_notify,
results, report, kernel, spec, records.
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


# --- the boot record (written here on the boot path; read back by commands.record) ---

RECORD_DIR = "/run/guest-agent"  # GUEST_AGENT_RECORD_DIR names another (the tests)
RECORD_NAME = "boot.json"


def record_dir() -> str:
    return os.environ.get("GUEST_AGENT_RECORD_DIR", RECORD_DIR)


def write_record(text: str, directory: str = RECORD_DIR) -> str | None:
    """Write TEXT (the record's JSON) as DIRECTORY/boot.json; None when written, else why not."""
    data = text.encode()
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


# --- the run lock: two runs on one target root must not mount the same things at once ---

LOCK_TIMEOUT = 120


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

"""Kernel uevents without udev: a stdlib AF_NETLINK socket and a pure parser.

Use it "register before check": open the monitor, then look for the device,
then re-check after every event until the deadline. Events that arrive between
opening and checking are queued in the socket, so none is lost to a race.
"""

from __future__ import annotations

import _socket as socket  # the C module: `socket` would import enum, selectors... for nothing
import errno
import select
import time
from types import MappingProxyType, TracebackType

from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Mapping

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1  # the kernel's multicast group (udevd re-broadcasts on group 2)
RCVBUF = 4 << 20  # a coldplug burst must not overflow the queue
RECV_SIZE = 64 << 10  # kernel uevents are < 8 KiB (UEVENT_BUFFER_SIZE 2048 + header)
DEGRADED_SLEEP = 0.1
_SO_RCVBUFFORCE = 33  # Linux; not exported by the socket module


class Uevent(NamedTuple):
    action: str  # add, remove, change, bind, unbind, move, online, offline; "overflow" (see wait)
    devpath: str  # "/devices/pci0000:00/0000:00:02.0/virtio1"
    subsystem: str | None
    env: Mapping[str, str]

    def __hash__(self) -> int:  # env (a read-only mapping) is not hashable: leave it out
        return hash((self.action, self.devpath, self.subsystem))


def parse_uevent(data: bytes) -> Uevent | None:
    """Parse a kernel uevent, "ACTION@DEVPATH\\0KEY=VAL\\0...". Never raises.

    libudev-format messages (udevd's re-broadcast, "libudev\\0" header) and
    unparsable headers give None; KEY=VAL parts that do not parse are dropped.
    """
    if data.startswith(b"libudev\0"):
        return None
    parts = data.split(b"\0")
    action_b, at, devpath_b = parts[0].partition(b"@")
    if not at or not action_b or not devpath_b.startswith(b"/"):
        return None
    try:
        action, devpath = action_b.decode(), devpath_b.decode()
    except UnicodeDecodeError:
        return None
    env: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition(b"=")
        if not eq or not key:
            continue
        try:
            env[key.decode()] = value.decode()
        except UnicodeDecodeError:
            continue
    return Uevent(action, devpath, env.get("SUBSYSTEM"), MappingProxyType(env))


OVERFLOW = Uevent("overflow", "/", None, MappingProxyType({}))


class UeventMonitor:
    """Kernel uevent listener (context manager).

    `available` is False when the socket cannot be opened (EPERM, EAFNOSUPPORT,
    EPROTONOSUPPORT: not root, a restricted sandbox, no netlink); `error` then
    says why. In that case `wait()` sleeps min(timeout, 0.1 s) and returns None,
    so a caller that re-checks after every wait() degrades to polling.

    When the kernel dropped events (receive queue overflow, ENOBUFS), `wait()`
    returns OVERFLOW (action "overflow"): events were lost, re-check everything.
    """

    def __init__(self, rcvbuf: int = RCVBUF) -> None:
        self._rcvbuf = rcvbuf
        self._sock: socket.socket | None = None
        self._poll: select.poll | None = None
        self.available = False
        self.error: str | None = None

    def open(self) -> UeventMonitor:
        if self._sock is not None:
            return self
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT
            )
        except (OSError, AttributeError) as e:  # AttributeError: no AF_NETLINK (non-Linux)
            self.error = f"uevent socket unavailable: {e}"
            return self
        try:
            try:  # RCVBUFFORCE (root) ignores rmem_max; plain RCVBUF is capped by it
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, self._rcvbuf)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf)
            sock.bind((0, KERNEL_GROUP))
        except OSError as e:
            sock.close()
            self.error = f"uevent socket unavailable: {e}"
            return self
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self.available = True
        self.error = None
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self._poll = None
        self.available = False

    def __enter__(self) -> UeventMonitor:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait(self, timeout: float) -> Uevent | None:
        """The next kernel uevent within `timeout` seconds, or None on timeout."""
        if self._sock is None or self._poll is None:
            if timeout > 0:
                time.sleep(min(timeout, DEGRADED_SLEEP))
            return None
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            remaining = deadline - time.monotonic()
            if not self._poll.poll(max(0, int(remaining * 1000 + 0.999))):
                return None
            try:
                data, (pid, _groups) = self._sock.recvfrom(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return OVERFLOW
                # Unexpected: degrade to polling rather than fail the caller.
                self.close()
                self.error = f"uevent socket failed: {e}"
                return None
            # Only the kernel (port id 0) sends on group 1; ignore anyone else.
            event = parse_uevent(data) if pid == 0 else None
            if event is not None:
                return event
            if time.monotonic() >= deadline:
                return None


__all__ = ["OVERFLOW", "Uevent", "UeventMonitor", "parse_uevent"]

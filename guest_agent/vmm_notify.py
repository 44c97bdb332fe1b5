"""Tell the host: `sd_notify` messages to the VMM's notify socket (systemd's VM interface).

A VMM that wants to hear from its guest passes the systemd credential
`vmm.notify_socket` (microvm.nix's cloud-hypervisor runner: `vsock-stream:2:8888`,
relayed to the host unit's NOTIFY_SOCKET); guest_agent.vmm_address reads it and
its address. `mount-all` reads the SMBIOS table (one small read) and imports the
two only when the credential's name is there or on the command line.

`Host` is the socket of one run: `vsock:` sends datagrams, falling back to seqpacket,
then stream where the transport has no datagrams, as systemd does. A run's sends
share one short budget; nothing is retried; `READY=1` is never sent (it is the
guest's PID 1's to send). `summary` is the `STATUS=` line and the `X_GUEST_AGENT_*`
fields, from the boot record (also `status`'s line).

Pure except `send` (one socket).
"""

from __future__ import annotations

import os

from guest_agent import vmm_address as va

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from guest_agent.vmm_address import Address

# Seconds, for all of a run's socket calls together (Host): with what the rest of the
# notify path costs (bench/notify_cost.py: 12 to 14 ms of an emulated guest), a host
# that never answers adds at most 50 ms to a boot.
SEND_TIMEOUT = 0.035

# --- the messages ------------------------------------------------------------------


def field(value: str) -> str:
    """VALUE made safe for one `KEY=VALUE` line: what a path or tag quotes cannot end
    the line or start a field (newlines, other control characters and backslashes
    are escaped)."""
    if value.isprintable() and "\\" not in value:
        return value  # the usual case, at C speed: nothing to escape
    out = []
    for c in value:
        if c == "\\":
            out.append("\\\\")
        elif ord(c) < 0x20 or ord(c) == 0x7F or "\ud800" <= c <= "\udfff":
            out.append(f"\\x{ord(c) & 0xFF:02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def message(fields: list[tuple[str, str]]) -> bytes:
    """`KEY=VALUE` lines, each value escaped by `field`; never READY=1."""
    lines = []
    for key, value in fields:
        if key == "READY":
            raise ValueError("READY= is PID 1's to send")
        lines.append(f"{key}={field(value)}")
    return ("\n".join(lines) + "\n").encode("utf-8", "backslashreplace")


def send(address: Address, payload: bytes, timeout: float = SEND_TIMEOUT) -> str | None:
    """Send PAYLOAD once; None when it went, else why not (one line's worth)."""
    import _socket as socket  # the C module: `socket` imports enum, selectors... (200 ms)
    import errno

    last = "no socket type to try"
    for kind in address.types:
        try:
            sock = socket.socket(address.family, kind | socket.SOCK_CLOEXEC)
        except OSError as e:
            # qemu's vsock has no datagrams (ENODEV/EOPNOTSUPP): try the next type
            last = f"cannot open the socket: {os.strerror(e.errno or 0)}"
            if e.errno in (
                errno.ENODEV,
                errno.EOPNOTSUPP,
                errno.ESOCKTNOSUPPORT,
                errno.EPROTONOSUPPORT,
            ):
                continue
            return last
        try:
            sock.settimeout(timeout)
            if kind == socket.SOCK_DGRAM:
                sock.sendto(payload, address.target)
            else:
                sock.connect(address.target)
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            return None
        except TimeoutError:
            return f"no answer within {timeout * 1000:.0f} ms"
        except OSError as e:
            last = os.strerror(e.errno) if e.errno else str(e)
            if e.errno in (errno.ENODEV, errno.EOPNOTSUPP, errno.ESOCKTNOSUPPORT, errno.EPROTOTYPE):
                continue
            return last
        finally:
            sock.close()
    return last


class Host:
    """The VMM's notify socket for one run. A bad address, a module that does not
    load or a send that fails is one warning; after a failed send nothing more is
    sent (no retry: the boot never waits for the host). The run's sends share one
    budget of SEND_TIMEOUT: each waits at most what the ones before it left."""

    def __init__(self, address: Address, origin: str, warn: Callable[[str, str], None]) -> None:
        self.address = address
        self.origin = origin
        self._warn = warn
        self._gave_up = False
        self._left = SEND_TIMEOUT

    @classmethod
    def find(
        cls,
        cmdline_text: str,
        table: bytes,
        warn: Callable[[str, str], None],
        load_module: Callable[[str], str | None],
    ) -> Host | None:
        from guest_agent.config.merge import split_cmdline

        text = va.read_credential(list(split_cmdline(cmdline_text)), table)
        if text is None:
            return None
        origin = f"{va.CREDENTIAL}={field(text)}"
        try:
            address = va.parse_address(text)
        except va.BadAddress as e:
            warn(origin, f"the host is not told: {e}")
            return None
        modules = va.modules_for(address)
        if "vmw_vsock_virtio_transport" in modules and va.no_vsock_device():
            warn(origin, "the host is not told: this guest has no virtio-vsock device")
            return None
        for module in modules:
            if os.path.isdir(f"{va.SYS_MODULE}/{module}"):
                continue  # loaded (by udev) or built in: no loader to import
            why = load_module(module)
            if why is not None:
                warn(origin, f"the host is not told: {why}")
                return None
        return cls(address, origin, warn)

    def tell(self, fields: list[tuple[str, str]]) -> None:
        if self._gave_up:
            return
        import time

        started = time.monotonic()
        if self._left > 0:
            why = send(self.address, message(fields), self._left)
        else:
            why = f"no answer within {SEND_TIMEOUT * 1000:.0f} ms"
        self._left -= time.monotonic() - started
        if why is not None:
            self._gave_up = True
            self._warn(self.origin, f"the host did not hear the agent: {why}")


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

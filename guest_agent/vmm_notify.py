"""Tell the host: `sd_notify` messages to the VMM's notify socket (systemd's VM interface).

A VMM that wants to hear from its guest passes the systemd credential
`vmm.notify_socket` (microvm.nix's cloud-hypervisor runner:
`vsock-stream:2:8888`, relayed to the host unit's NOTIFY_SOCKET). It comes
either as an SMBIOS type 11 (OEM strings) entry
`io.systemd.credential:vmm.notify_socket=ADDRESS` (or `.binary:` with base64),
or on the kernel command line as
`systemd.set_credential=vmm.notify_socket:ADDRESS` (or `_binary`, base64).

The SMBIOS strings come from the raw table `/sys/firmware/dmi/tables/DMI`,
which the kernel exports whenever it has DMI (built in on x86 and arm64): no
`dmi_sysfs` module is needed; `mount-all` reads it (one small read) and imports
this module only when the credential's name is in it or on the command line. Addresses take every form sd_notify takes: `vsock:CID:PORT` (datagram,
falling back to seqpacket, then stream, where the transport has no datagrams,
as systemd does), `vsock-dgram:`, `vsock-seqpacket:`, `vsock-stream:`, an
AF_UNIX path, `@abstract`. A send is bounded by a short timeout; nothing is
retried; `READY=1` is never sent (it is the guest's PID 1's to send).

Pure except `send` (one socket).
"""

from __future__ import annotations

import os

from guest_agent.records import NamedTuple

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

CREDENTIAL = "vmm.notify_socket"
# Seconds, for all of a run's socket calls together (Host): with what the rest of the
# notify path costs (bench/notify_cost.py: about 12 ms of an emulated guest), a host
# that never answers adds at most 50 ms to a boot.
SEND_TIMEOUT = 0.035

_SMBIOS_PREFIXES = ("io.systemd.credential:", "io.systemd.credential.binary:")
_CMDLINE_KEYS = ("systemd.set_credential", "systemd.set_credential_binary")
_CIDS = {"hypervisor": 0, "local": 1, "host": 2}
_OEM_STRINGS = 11  # SMBIOS structure type
_END_OF_TABLE = 127


class Address(NamedTuple):
    """Where to send: FAMILY (socket.AF_UNIX or AF_VSOCK), the socket types to try in
    order, and the address as `socket.connect` takes it."""

    text: str
    family: int
    types: tuple[int, ...]
    target: str | bytes | tuple[int, int]  # AF_UNIX: a path or b'\\0name'; AF_VSOCK: (cid, port)


class BadAddress(ValueError):
    pass


def parse_address(text: str) -> Address:
    """ADDRESS as systemd's sd_notify reads NOTIFY_SOCKET; BadAddress says why not."""
    import _socket as socket  # the C module: `socket` imports enum, selectors... (200 ms)

    if text.startswith("/"):
        if len(text.encode()) > 107:
            raise BadAddress("an AF_UNIX path is at most 107 bytes")
        return Address(text, socket.AF_UNIX, (socket.SOCK_DGRAM,), text)
    if text.startswith("@") and len(text) > 1:
        return Address(text, socket.AF_UNIX, (socket.SOCK_DGRAM,), b"\0" + text[1:].encode())
    kind, sep, rest = text.partition(":")
    types = {
        "vsock": (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_STREAM),
        "vsock-dgram": (socket.SOCK_DGRAM,),
        "vsock-seqpacket": (socket.SOCK_SEQPACKET,),
        "vsock-stream": (socket.SOCK_STREAM,),
    }.get(kind)
    if not sep or types is None:
        raise BadAddress(
            "expected vsock:CID:PORT (or vsock-stream:, vsock-dgram:, vsock-seqpacket:), "
            "an absolute AF_UNIX path or @abstract"
        )
    cid_text, sep, port_text = rest.partition(":")
    if not sep:
        raise BadAddress("expected CID:PORT after the vsock kind")
    cid = _CIDS[cid_text] if cid_text in _CIDS else _number(cid_text, "CID")
    port = _number(port_text, "PORT")
    return Address(text, socket.AF_VSOCK, types, (cid, port))


def _number(text: str, what: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise BadAddress(f"{what} {text!r} is not a number")
    value = int(text)
    if value > 0xFFFFFFFF or (what == "CID" and value == 0xFFFFFFFF):
        raise BadAddress(f"{what} {text} is out of range")
    return value


# --- where the credential comes from ----------------------------------------------


def credential_from_cmdline(tokens: list[str]) -> str | None:
    """The last `systemd.set_credential[_binary]=vmm.notify_socket:VALUE` word's VALUE."""
    found = None
    for token in tokens:
        key, sep, value = token.partition("=")
        if sep and key in _CMDLINE_KEYS:
            name, sep, data = value.partition(":")
            if sep and name == CREDENTIAL:
                found = _decoded(data) if key.endswith("_binary") else data
    return found


def oem_strings(table: bytes) -> list[bytes]:
    """Every string of every SMBIOS type 11 structure in the raw TABLE, in order.

    A structure: type, length, handle (4 bytes), its formatted part up to
    `length`, then its strings, each NUL-terminated, the set ending in a second
    NUL. A truncated or malformed table ends the walk: never an exception.
    """
    strings: list[bytes] = []
    pos = 0
    while pos + 4 <= len(table):
        kind, length = table[pos], table[pos + 1]
        if length < 4:
            break
        end = table.find(b"\0\0", pos + length)
        if end < 0:
            break
        if kind == _OEM_STRINGS:
            strings += [s for s in table[pos + length : end].split(b"\0") if s]
        if kind == _END_OF_TABLE:
            break
        pos = end + 2
    return strings


def credential_from_smbios(strings: list[bytes]) -> str | None:
    found = None
    for raw in strings:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            continue
        for prefix in _SMBIOS_PREFIXES:
            if text.startswith(prefix):
                name, sep, value = text[len(prefix) :].partition("=")
                if sep and name == CREDENTIAL:
                    found = _decoded(value) if prefix.endswith("binary:") else value
    return found


def _decoded(data: str) -> str | None:
    import base64
    import binascii

    try:
        return base64.b64decode(data, validate=True).decode().rstrip("\n")
    except (binascii.Error, UnicodeDecodeError):
        return None


def read_credential(tokens: list[str], table: bytes) -> str | None:
    """The notify socket's address, or None: the kernel command line's, else the
    SMBIOS table's (the command line wins, as in systemd's import order)."""
    from_cmdline = credential_from_cmdline(tokens)
    if from_cmdline is not None:
        return from_cmdline
    return credential_from_smbios(oem_strings(table)) if table else None


# The modules a send may need, by where it goes (loaded only when the credential is there).
def modules_for(address: Address) -> tuple[str, ...]:
    import _socket as socket  # the C module: `socket` imports enum, selectors... (200 ms)

    if address.family != socket.AF_VSOCK:
        return ()
    cid = address.target[0] if isinstance(address.target, tuple) else None
    return ("vsock_loopback",) if cid == _CIDS["local"] else ("vmw_vsock_virtio_transport",)


SYS_MODULE = "/sys/module"
VIRTIO_DEVICES = "/sys/bus/virtio/devices"
_VIRTIO_VSOCK = "0x0013"  # the virtio device ID of a vsock device


def no_vsock_device(bus: str = VIRTIO_DEVICES) -> bool:
    """Whether the virtio bus shows devices, none of them vsock: then the host cannot
    listen over vsock, and its transport module (seconds to load in an emulated guest)
    is not loaded. An empty or absent bus (its transport not loaded yet) says nothing."""
    try:
        names = os.listdir(bus)
    except OSError:
        return False
    for name in names:
        try:
            with open(f"{bus}/{name}/device", "rb") as f:
                if f.read(16).strip() == _VIRTIO_VSOCK.encode():
                    return False
        except OSError:
            return False  # a device that cannot be read might be the one
    return bool(names)


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

        text = read_credential(list(split_cmdline(cmdline_text)), table)
        if text is None:
            return None
        origin = f"{CREDENTIAL}={field(text)}"
        try:
            address = parse_address(text)
        except BadAddress as e:
            warn(origin, f"the host is not told: {e}")
            return None
        modules = modules_for(address)
        if "vmw_vsock_virtio_transport" in modules and no_vsock_device():
            warn(origin, "the host is not told: this guest has no virtio-vsock device")
            return None
        for module in modules:
            if os.path.isdir(f"{SYS_MODULE}/{module}"):
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

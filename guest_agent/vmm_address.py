"""Where the VMM listens: the `vmm.notify_socket` credential and its address.

The credential comes either as an SMBIOS type 11 (OEM strings) entry
`io.systemd.credential:vmm.notify_socket=ADDRESS` (or `.binary:` with base64),
read from the raw table `/sys/firmware/dmi/tables/DMI` (no `dmi_sysfs` module
needed), or on the kernel command line as
`systemd.set_credential=vmm.notify_socket:ADDRESS` (or `_binary`, base64); the
command line wins. Addresses take every form sd_notify takes: `vsock:CID:PORT`,
`vsock-dgram:`, `vsock-seqpacket:`, `vsock-stream:`, an AF_UNIX path, `@abstract`.
What reaching one needs (the vsock transport's module, and whether this guest has
a vsock device at all) is here too. Pure: reads sysfs, opens no socket.
Imported, with guest_agent.vmm_notify, only when the credential's name is there.
"""

from __future__ import annotations

import os

from guest_agent.records import NamedTuple

CREDENTIAL = "vmm.notify_socket"
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

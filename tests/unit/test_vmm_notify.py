"""The notify socket's address, the credential's two sources and the message's escaping."""

from __future__ import annotations

import base64
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from guest_agent import vmm_address as va
from guest_agent import vmm_notify as vn


def smbios(kind: int, strings: list[bytes], formatted: bytes = b"") -> bytes:
    """One SMBIOS structure: header, formatted part, string set."""
    header = struct.pack("<BBH", kind, 4 + len(formatted), 0x1234) + formatted
    body = b"".join(s + b"\0" for s in strings) if strings else b"\0"
    return header + body + b"\0"


@pytest.mark.parametrize(
    ("text", "family", "types", "target"),
    [
        ("vsock-stream:2:8888", socket.AF_VSOCK, (socket.SOCK_STREAM,), (2, 8888)),
        ("vsock-dgram:host:1", socket.AF_VSOCK, (socket.SOCK_DGRAM,), (2, 1)),
        ("vsock-seqpacket:local:7", socket.AF_VSOCK, (socket.SOCK_SEQPACKET,), (1, 7)),
        (
            "vsock:hypervisor:9",
            socket.AF_VSOCK,
            (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET, socket.SOCK_STREAM),
            (0, 9),
        ),
        ("/run/host/notify", socket.AF_UNIX, (socket.SOCK_DGRAM,), "/run/host/notify"),
        ("@vmm", socket.AF_UNIX, (socket.SOCK_DGRAM,), b"\0vmm"),
    ],
)
def test_every_address_form_sd_notify_takes(text, family, types, target) -> None:
    address = va.parse_address(text)
    assert (address.family, address.types, address.target) == (family, types, target)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "@",
        "tcp:1.2.3.4:5",
        "vsock:2",
        "vsock::8888",
        "vsock:2:x",
        "vsock:4294967295:1",
        "vsock:2:4294967296",
        "vsock:٣:1",
        "relative/path",
        "/" + "a" * 107,
    ],
)
def test_a_bad_address_says_why(text: str) -> None:
    with pytest.raises(va.BadAddress):
        va.parse_address(text)


def test_the_command_line_credential_last_word_wins_and_binary_is_base64() -> None:
    encoded = base64.b64encode(b"vsock-stream:2:9999").decode()
    assert va.credential_from_cmdline(["quiet", "systemd.set_credential=other:x"]) is None
    assert (
        va.credential_from_cmdline(["systemd.set_credential=vmm.notify_socket:vsock:2:1"])
        == "vsock:2:1"
    )
    tokens = [
        "systemd.set_credential=vmm.notify_socket:vsock:2:1",
        f"systemd.set_credential_binary=vmm.notify_socket:{encoded}",
    ]
    assert va.credential_from_cmdline(tokens) == "vsock-stream:2:9999"
    assert (
        va.credential_from_cmdline(["systemd.set_credential_binary=vmm.notify_socket:!!"]) is None
    )


def test_oem_strings_are_read_from_the_raw_table_and_nothing_else() -> None:
    table = (
        smbios(0, [b"vendor"], b"\x01\x02")
        + smbios(
            11, [b"io.systemd.credential:vmm.notify_socket=vsock-stream:2:8888", b"x"], b"\x02"
        )
        + smbios(1, [b"io.systemd.credential:vmm.notify_socket=not-from-type-1"])
        + smbios(127, [])
    )
    strings = va.oem_strings(table)
    assert strings == [b"io.systemd.credential:vmm.notify_socket=vsock-stream:2:8888", b"x"]
    assert va.credential_from_smbios(strings) == "vsock-stream:2:8888"


def test_a_binary_smbios_credential_and_junk_around_it() -> None:
    encoded = base64.b64encode(b"@vmm-notify").decode()
    strings = [b"\xff\xfe", b"io.systemd.credential.binary:vmm.notify_socket=" + encoded.encode()]
    assert va.credential_from_smbios(strings) == "@vmm-notify"


@pytest.mark.parametrize(
    "table",
    [
        b"",
        b"\x0b",
        b"\x0b\x02\x00\x00",
        smbios(11, [b"io.systemd.credential:a=b"])[:-3],
        b"\x00" * 64,
    ],
)
def test_a_truncated_or_malformed_table_ends_the_walk_without_an_exception(table: bytes) -> None:
    assert isinstance(va.oem_strings(table), list)


def test_read_credential_prefers_the_command_line_and_reads_the_table_otherwise() -> None:
    table = smbios(11, [b"io.systemd.credential:vmm.notify_socket=vsock:2:5"])
    assert va.read_credential([], table) == "vsock:2:5"
    tokens = ["systemd.set_credential=vmm.notify_socket:/run/n"]
    assert va.read_credential(tokens, table) == "/run/n"
    assert va.read_credential([], b"") is None


def test_the_modules_a_send_needs() -> None:
    assert va.modules_for(va.parse_address("vsock-stream:2:8888")) == (
        "vmw_vsock_virtio_transport",
    )
    assert va.modules_for(va.parse_address("vsock:local:8888")) == ("vsock_loopback",)
    assert va.modules_for(va.parse_address("/run/notify")) == ()


def test_a_quoted_value_cannot_forge_a_field_or_a_line() -> None:
    payload = vn.message(
        [("STATUS", "failed: /home\nREADY=1"), ("X_GUEST_AGENT_SPEC", "a\\nb\x00")]
    )
    lines = payload.decode().split("\n")
    assert lines == [
        "STATUS=failed: /home\\x0aREADY=1",
        "X_GUEST_AGENT_SPEC=a\\\\nb\\x00",
        "",
    ]


def test_ready_is_never_sent() -> None:
    with pytest.raises(ValueError):
        vn.message([("READY", "1")])


def _timed_host(
    monkeypatch: pytest.MonkeyPatch,
    address: str,
    takes: float,
    answer: Callable[[int, float], str | None],
) -> tuple[vn.Host, list[float], list[tuple[str, str]]]:
    """A Host for ADDRESS whose sends each take TAKES seconds of a fake clock and return
    ANSWER(the send's number, its timeout); with the timeouts given and the warnings."""
    clock = [100.0]
    given: list[float] = []

    def send(_: va.Address, payload: bytes, timeout: float) -> str | None:
        given.append(timeout)
        clock[0] += takes
        return answer(len(given), timeout)

    monkeypatch.setattr(vn, "send", send)
    monkeypatch.setattr("time.monotonic", lambda: clock[0])
    warnings: list[tuple[str, str]] = []
    origin = f"vmm.notify_socket={address}"
    host = vn.Host(va.parse_address(address), origin, lambda *w: warnings.append(w))
    return host, given, warnings


def test_the_sends_of_a_run_share_one_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each send waits at most what the ones before it left of SEND_TIMEOUT; once it is
    spent, nothing more is tried and the warning says so."""
    spent = 0.6 * vn.SEND_TIMEOUT  # what the first send takes of the budget
    host, given, warnings = _timed_host(
        monkeypatch,
        "/run/notify",
        spent,
        lambda n, timeout: None if n == 1 else f"no answer within {timeout * 1000:.0f} ms",
    )
    host.tell([("STATUS", "guest-agent: mounting")])
    host.tell([("STATUS", "guest-agent: 1 mounted")])
    host.tell([("STATUS", "never sent")])
    left = vn.SEND_TIMEOUT - spent
    assert given == [pytest.approx(vn.SEND_TIMEOUT), pytest.approx(left)]
    assert warnings == [
        (
            "vmm.notify_socket=/run/notify",
            f"the host did not hear the agent: no answer within {left * 1000:.0f} ms",
        )
    ]


def test_a_spent_budget_is_a_warning_without_a_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # a send that returned late: the budget spent, yet it went
    host, given, warnings = _timed_host(
        monkeypatch, "@notify", vn.SEND_TIMEOUT + 0.01, lambda n, timeout: None
    )
    host.tell([("STATUS", "guest-agent: mounting")])
    host.tell([("STATUS", "guest-agent: 1 mounted")])
    assert len(given) == 1
    budget = f"{vn.SEND_TIMEOUT * 1000:.0f} ms"
    assert warnings == [
        ("vmm.notify_socket=@notify", f"the host did not hear the agent: no answer within {budget}")
    ]


def _virtio_bus(root: Path, *device_ids: str) -> str:
    bus = root / "devices"
    bus.mkdir(parents=True)
    for i, device in enumerate(device_ids):
        (bus / f"virtio{i}").mkdir()
        (bus / f"virtio{i}" / "device").write_text(device + "\n")
    return str(bus)


def test_no_vsock_device_only_when_the_bus_shows_devices_and_none_is_vsock(tmp_path: Path) -> None:
    assert va.no_vsock_device(_virtio_bus(tmp_path / "a", "0x0009", "0x001a")) is True
    assert va.no_vsock_device(_virtio_bus(tmp_path / "b", "0x0009", "0x0013")) is False
    assert va.no_vsock_device(_virtio_bus(tmp_path / "c")) is False  # transport not loaded yet
    assert va.no_vsock_device(str(tmp_path / "absent")) is False


@pytest.mark.parametrize(
    ("devices", "loaded", "loads", "warned"),
    [
        (("0x0009",), (), [], "the host is not told: this guest has no virtio-vsock device"),
        (("0x0009", "0x0013"), (), ["vmw_vsock_virtio_transport"], None),
        (("0x0013",), ("vmw_vsock_virtio_transport",), [], None),  # udev loaded it: no loader
        ((), (), ["vmw_vsock_virtio_transport"], None),  # nothing seen yet: load to find out
    ],
)
def test_the_transport_is_loaded_only_when_a_host_can_listen(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    devices: tuple[str, ...],
    loaded: tuple[str, ...],
    loads: list[str],
    warned: str | None,
) -> None:
    bus = _virtio_bus(tmp_path, *devices)
    monkeypatch.setattr(va, "VIRTIO_DEVICES", bus)
    monkeypatch.setattr(va.no_vsock_device, "__defaults__", (bus,))
    for name in loaded:
        (tmp_path / "module" / name).mkdir(parents=True)
    monkeypatch.setattr(va, "SYS_MODULE", str(tmp_path / "module"))
    asked: list[str] = []
    warnings: list[str] = []
    host = vn.Host.find(
        "systemd.set_credential=vmm.notify_socket:vsock-stream:2:8888",
        b"",
        lambda origin, reason: warnings.append(reason),
        lambda name: asked.append(name),
    )
    assert asked == loads
    assert warnings == ([warned] if warned else [])
    assert (host is None) == (warned is not None)

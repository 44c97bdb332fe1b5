"""sd_notify over AF_UNIX on this machine: the path and abstract forms arrive whole, a missing
listener is one reason, a listener that never reads cannot hold the send beyond its timeout.
(The vsock forms need a vsock transport: this host has none, the guests have vsock_loopback.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from guest_agent import vmm_address as va
from guest_agent import vmm_notify as vn

PAYLOAD = vn.message([("STATUS", "guest-agent: 3 mounted"), ("X_GUEST_AGENT_RESULT", "ok")])


def _listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_a_path_socket_receives_the_message_whole(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _listener(path) as listener:
        assert vn.send(va.parse_address(path), PAYLOAD) is None
        assert listener.recv(4096) == PAYLOAD


def test_an_abstract_socket_receives_the_message_whole() -> None:
    name = f"guest-agent-test-{os.getpid()}"
    with _listener(b"\0" + name.encode()) as listener:
        assert vn.send(va.parse_address("@" + name), PAYLOAD) is None
        assert listener.recv(4096) == PAYLOAD


def test_no_listener_is_one_reason_not_an_exception(tmp_path: Path) -> None:
    reason = vn.send(va.parse_address(str(tmp_path / "nobody")), PAYLOAD)
    assert reason == os.strerror(2)  # ENOENT
    bound = tmp_path / "gone"
    _listener(str(bound)).close()  # the path stays, nobody listens
    assert vn.send(va.parse_address(str(bound)), PAYLOAD) == os.strerror(111)  # ECONNREFUSED


def test_a_listener_that_never_reads_cannot_hold_the_boot(tmp_path: Path) -> None:
    path = str(tmp_path / "full")
    reasons: list[str | None] = []

    def fill() -> None:  # until its queue is full: then a send must give up with a reason
        for _ in range(500):
            reasons.append(vn.send(address, PAYLOAD * 20, timeout=0.05))
            if reasons[-1] is not None:
                return

    with _listener(path) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        address = va.parse_address(path)
        sender = threading.Thread(target=fill, daemon=True)
        sender.start()
        sender.join(30)  # a guard against a hang, not a measurement
        assert not sender.is_alive(), "a send blocked on a listener that does not read"
    assert reasons[-1] == "no answer within 50 ms", reasons[-3:]


def test_telling_the_host_imports_not_the_socket_module(tmp_path: Path) -> None:
    """The notify path uses the C module `_socket`: `socket` (with enum, selectors…) cost a
    run with the credential 200 ms of an emulated guest (bench/notify_cost.py)."""
    path = str(tmp_path / "notify")
    code = (
        "import sys; from guest_agent import vmm_notify as vn\n"
        f"host = vn.Host.find('systemd.set_credential=vmm.notify_socket:{path}', b'',"
        " lambda *w: None, lambda m: None)\n"
        "host.tell([('STATUS', 'guest-agent: 1 mounted')])\n"
        "print(sorted(m for m in ('socket', 'selectors', 'enum') if m in sys.modules))\n"
    )
    with _listener(path) as listener:
        done = subprocess.run(
            [sys.executable, "-S", "-c", code],
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            capture_output=True,
            text=True,
            check=True,
        )
        assert listener.recv(4096) == b"STATUS=guest-agent: 1 mounted\n"
    assert done.stdout == "[]\n", done

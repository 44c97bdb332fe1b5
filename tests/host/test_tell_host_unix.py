"""Issue 22 on this machine: mount-all's boot record and what the host hears over an
AF_UNIX notify socket named by the vmm.notify_socket credential on the command line
(the vsock forms are booted in tests/vm/test_tell_host.py)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from conftest import HostEnv

MOUNTED = "microvm.volume=tmpfs:/a:tmpfs"
MISSING = "microvm.volume=LABEL=no-such-disk:/b:ext4:x-device-timeout=0"
MISSING_NOFAIL = "microvm.volume=LABEL=no-such-either:/c:ext4:nofail,x-device-timeout=0"


def listen(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0)
    return sock


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536).decode())
        except BlockingIOError:
            return out


def test_a_clean_run_tells_the_host_and_keeps_its_record(
    host: HostEnv, tmp_path: Path, _record_dir: Path
) -> None:
    path = str(tmp_path / "notify")
    with listen(path) as sock:
        host.set_cmdline(MOUNTED, f"systemd.set_credential=vmm.notify_socket:{path}")
        run = host.mount_all()
        assert run.returncode == 0, run.stderr
        assert received(sock) == [
            "STATUS=guest-agent: mounting\n",
            "STATUS=guest-agent: 1 mounted\n"
            "X_GUEST_AGENT_RESULT=ok\n"
            "X_GUEST_AGENT_MOUNTED=1\n"
            "X_GUEST_AGENT_ERRORS=0\n"
            "X_GUEST_AGENT_WARNINGS=0\n",
        ]
    record = json.loads((_record_dir / "boot.json").read_text())
    assert list(record) == [
        "version",
        "ok",
        "mounts",
        "problems",
        "started",
        "finished",
        "exit_status",
    ]
    assert (record["ok"], record["exit_status"], record["problems"]) == (True, 0, [])
    assert [(m["where"], m["status"]) for m in record["mounts"]] == [("/a", "mounted")]
    assert record["started"] <= record["finished"]
    status = host.agent("status", "--json")
    assert json.loads(status.stdout)["boot"] == record
    text = host.agent("status")
    assert text.stderr.splitlines()[-1].endswith("exit status 0): 1 mounted"), text.stderr


def test_a_failed_run_names_what_failed_to_the_host(host: HostEnv, tmp_path: Path) -> None:
    name = f"guest-agent-notify-{os.getpid()}"
    with listen(b"\0" + name.encode()) as sock:
        host.set_cmdline(
            MOUNTED, MISSING, MISSING_NOFAIL, f"systemd.set_credential=vmm.notify_socket:@{name}"
        )
        run = host.mount_all()
        assert run.returncode == 1, run.stderr
        start, end = received(sock)
    assert start == "STATUS=guest-agent: mounting\n"
    lines = end.splitlines()
    assert lines[0].startswith(f"STATUS=guest-agent: 2 failed, 1 mounted; 1 failed: {MISSING}: ")
    assert lines[1:6] == [
        "X_GUEST_AGENT_RESULT=failed",
        "X_GUEST_AGENT_FAILED=2",
        "X_GUEST_AGENT_MOUNTED=1",
        "X_GUEST_AGENT_ERRORS=1",
        "X_GUEST_AGENT_WARNINGS=1",
    ]
    assert lines[6].startswith(f"X_GUEST_AGENT_ERROR_1={MISSING}: ") and len(lines) == 7


def test_a_host_that_does_not_listen_is_one_warning_and_changes_nothing(
    host: HostEnv, tmp_path: Path
) -> None:
    path = tmp_path / "nobody"
    host.set_cmdline(MOUNTED, f"systemd.set_credential=vmm.notify_socket:{path}")
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    warnings = [x for x in run.lines if "vmm.notify_socket" in x]
    assert warnings == [
        f"warning: vmm.notify_socket={path}: the host did not hear the agent: No such file or directory"
    ], run.lines
    host.set_cmdline(MOUNTED, "systemd.set_credential=vmm.notify_socket:tcp:1.2.3.4:5")
    run = host.mount_all()
    assert run.returncode == 0, run.stderr
    assert [x for x in run.lines if "vmm.notify_socket" in x] == [
        "warning: vmm.notify_socket=tcp:1.2.3.4:5: the host is not told: expected vsock:CID:PORT"
        " (or vsock-stream:, vsock-dgram:, vsock-seqpacket:), an absolute AF_UNIX path or @abstract"
    ], run.lines


def test_a_quoted_path_cannot_forge_a_field(host: HostEnv, tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with listen(path) as sock:
        host.set_cmdline(
            '"microvm.volume=LABEL=x\nX_GUEST_AGENT_RESULT=ok:/b:ext4:x-device-timeout=0"',
            f"systemd.set_credential=vmm.notify_socket:{path}",
        )
        run = host.mount_all()
        assert run.returncode == 1, run.stderr
        _, end = received(sock)
    keys = [line.split("=", 1)[0] for line in end.splitlines()]
    assert keys.count("X_GUEST_AGENT_RESULT") == 1 and "X_GUEST_AGENT_RESULT=failed" in end, end
    assert "\\x0aX_GUEST_AGENT_RESULT=ok" in end, end  # the spec's newline, escaped

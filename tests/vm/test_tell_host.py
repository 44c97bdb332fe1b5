"""Issue 22 in booted guests: what the host hears over vsock, the credential given as a
real SMBIOS type 11 string (qemu -smbios) or on the command line. This machine has no
/dev/vhost-vsock, so the listener runs in the guest on the kernel's vsock loopback
(vsock_loopback, CID 1 "local") and records every message; the agent loads the module
itself, as it would load vmw_vsock_virtio_transport for the host (CID 2)."""

from __future__ import annotations

import json
from collections.abc import Callable

import agent as ag
import pytest
import testbed as tb

pytestmark = pytest.mark.vm

LISTENER = r"""
import os, selectors, socket, sys
sel = selectors.DefaultSelector()
for kind, port in ((socket.SOCK_STREAM, 8888), (socket.SOCK_SEQPACKET, 8889)):
    s = socket.socket(socket.AF_VSOCK, kind)
    s.bind((1, port))
    s.listen()
    sel.register(s, selectors.EVENT_READ)
open("/tmp/listening", "w").close()
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.close()
        with open("/tmp/heard", "ab") as f:
            f.write(data + b"--end--\n")
"""

RUNS = {
    "clean": "microvm.volume=tmpfs:/srv/a:tmpfs",
    "failed": "microvm.volume=tmpfs:/srv/b:tmpfs microvm.volume=LABEL=gone:/srv/c:ext4:x-device-timeout=0",
    "nofail": "microvm.volume=tmpfs:/srv/d:tmpfs "
    "microvm.volume=LABEL=gone:/srv/e:ext4:nofail,x-device-timeout=0",
    "cmdline": "microvm.volume=tmpfs:/srv/f:tmpfs "
    "systemd.set_credential=vmm.notify_socket:vsock:local:8889",
}


def script() -> str:
    lines = [
        # the loopback transport for the listener; the agent loads it again (a no-op)
        "python3 -c 'from guest_agent.kmod.loader import ModuleLoader as L; print(L().load(\"vsock_loopback\"))'",
        "cat > /tmp/listen.py <<'EOF'\n" + LISTENER + "EOF",
        "python3 /tmp/listen.py 2>/tmp/listener.err &",
        "for i in $(seq 100); do [ -e /tmp/listening ] && break; sleep 0.1; done",
    ]
    for name, cmdline in RUNS.items():
        lines += [
            f"echo '{cmdline}' > /tmp/{name}.cmdline",
            f"guest-agent mount-all --cmdline /tmp/{name}.cmdline 2>/tmp/{name}.err; echo rc=$?",
            "sleep 0.5",
            f"echo @@{name}@@; cat /tmp/heard; : > /tmp/heard; cat /tmp/{name}.err",
        ]
    lines += [
        "echo @@record@@; cat /run/guest-agent/boot.json",
        "echo @@listener@@; cat /tmp/listener.err",
    ]
    return "\n".join(lines) + "\n"


def messages(section: str) -> list[str]:
    return [m.lstrip("\n") for m in section.split("--end--\n")[:-1]]


def test_the_host_hears_each_run_over_vsock(make_vm: Callable[..., tb.VM]) -> None:
    credential = "io.systemd.credential:vmm.notify_socket=vsock-stream:local:8888"
    vm = make_vm(qemu_args=["-smbios", f"type=11,value={credential}"])
    boot = vm.boot(script())
    assert boot.exit_code == 0, boot
    found = ag.sections(boot.results)
    assert found["listener"] == "", found["listener"]
    clean = messages(found["clean"])
    assert clean == [
        "STATUS=guest-agent: mounting\n",
        "STATUS=guest-agent: 1 mounted\nX_GUEST_AGENT_RESULT=ok\nX_GUEST_AGENT_MOUNTED=1\n"
        "X_GUEST_AGENT_ERRORS=0\nX_GUEST_AGENT_WARNINGS=0\n",
    ], found["clean"]
    start, end = messages(found["failed"])
    gone = "microvm.volume=LABEL=gone:/srv/c:ext4:x-device-timeout=0"
    assert start == "STATUS=guest-agent: mounting\n"
    lines = end.splitlines()
    assert lines[0].startswith(f"STATUS=guest-agent: 1 failed, 1 mounted; 1 failed: {gone}: "), end
    assert lines[1:5] == [
        "X_GUEST_AGENT_RESULT=failed",
        "X_GUEST_AGENT_FAILED=1",
        "X_GUEST_AGENT_MOUNTED=1",
        "X_GUEST_AGENT_ERRORS=1",
    ], end
    assert lines[5:6] == ["X_GUEST_AGENT_WARNINGS=0"] and lines[6].startswith(
        f"X_GUEST_AGENT_ERROR_1={gone}: "
    ), end
    _, end = messages(found["nofail"])
    assert end == (
        "STATUS=guest-agent: 1 failed, 1 mounted\nX_GUEST_AGENT_RESULT=ok\n"
        "X_GUEST_AGENT_FAILED=1\nX_GUEST_AGENT_MOUNTED=1\nX_GUEST_AGENT_ERRORS=0\n"
        "X_GUEST_AGENT_WARNINGS=1\n"
    ), found["nofail"]
    # the command line's credential wins over SMBIOS's; `vsock:` falls back from datagrams
    # (no vsock transport has them) to seqpacket, as systemd's sd_notify does
    assert messages(found["cmdline"]) == [
        "STATUS=guest-agent: mounting\n",
        "STATUS=guest-agent: 1 mounted\nX_GUEST_AGENT_RESULT=ok\nX_GUEST_AGENT_MOUNTED=1\n"
        "X_GUEST_AGENT_ERRORS=0\nX_GUEST_AGENT_WARNINGS=0\n",
    ], found["cmdline"]
    record = json.loads(found["record"])
    assert [(m["where"], m["status"]) for m in record["mounts"]] == [("/srv/f", "mounted")]
    assert (record["ok"], record["exit_status"]) == (True, 0)

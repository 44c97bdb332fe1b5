#!/usr/bin/env python3
"""What telling the host costs a boot (issue 22), measured in guests under -icount.

    python3 bench/notify_cost.py [--kernels 6.12,6.1] [--rounds 8] [--icount 3]

Per kernel, guests with qemu's `-icount shift=N,sleep=on` (the guest's clock counts
instructions, so the host's load does not move it) run `guest-agent mount-all`
with one tmpfs volume (the notify path's cost does not depend on the mounts):

1. Cold, the first run of a boot, in two rounds of boots: `off`, no credential;
   `on`, the credential `vsock-stream:host:8888` on the command line, and no
   virtio-vsock device (this machine has no /dev/vhost-vsock): the agent sees the
   virtio bus without one and says the host is not told (no module loaded);
   `local`, `vsock-stream:local:8888` with nobody listening yet: the vsock modules
   loaded by the agent (vsock, vsock_loopback: what a guest whose udev did not load
   its vsock transport pays), then a connect refused at once.
2. Warm, in the last `on` boot, ROUNDS rounds rotating the order of:
   - `off`: no credential;
   - `heard`: `vsock-stream:local:8888`, a listener on the vsock loopback in the guest
     that accepts and reads (a host that listens);
   - `missing`: an AF_UNIX path nobody bound (refused at once);
   - `full`: an AF_UNIX datagram socket whose queue a helper filled and never reads:
     the worst case, a send that waits for its whole budget (SEND_TIMEOUT).

Prints medians and each variant's cost over `off` (the goal: at most 50 ms in the worst
case); --json writes the raw numbers (bench/notify_cost.json by default). No assertions:
a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Env, Timings, boot_checked, log, median, run_kernels
from compare import with_icount

VOLUME = "microvm.volume=tmpfs:/srv/a:tmpfs"
CREDENTIAL = "systemd.set_credential=vmm.notify_socket:"
CMDLINES = {
    "off": VOLUME,
    "on": f"{VOLUME} {CREDENTIAL}vsock-stream:host:8888",
    "local": f"{VOLUME} {CREDENTIAL}vsock-stream:local:8888",
    "heard": f"{VOLUME} {CREDENTIAL}vsock-stream:local:8888",
    "missing": f"{VOLUME} {CREDENTIAL}/run/nobody.sock",
    "full": f"{VOLUME} {CREDENTIAL}/run/full.sock",
}
COLD = ("off", "on", "local")
WARM = ("off", "heard", "missing", "full")

LISTENER = r"""
import os, socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((1, 8888))
s.listen()
full = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
full.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
full.bind("/run/full.sock")
filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
filler.setblocking(False)
try:
    while True:
        filler.sendto(b"x" * 512, "/run/full.sock")
except BlockingIOError:
    pass
open("/tmp/listening", "w").close()
while True:
    conn, _ = s.accept()
    while conn.recv(65536):
        pass
    conn.close()
"""


def _files() -> str:
    return "".join(f"echo '{text}' > /tmp/{name}.cmdline\n" for name, text in CMDLINES.items())


def _run(label: str, name: str) -> str:
    return (
        f"timeit {label} guest-agent mount-all --cmdline /tmp/{name}.cmdline 2>/tmp/{label}.err\n"
        f"echo @@err {label}; cat /tmp/{label}.err\n"
        "umount /srv/a\n"
    )


def cold_script(name: str) -> str:
    return _files() + _run(f"cold-{name}", name)


def warm_script(rounds: int) -> str:
    lines = [
        _files(),
        "python3 -c 'from guest_agent.kmod.loader import ModuleLoader as L; L().load(\"vsock_loopback\")'\n",
        "cat > /tmp/listen.py <<'EOF'\n" + LISTENER + "EOF\n",
        "python3 /tmp/listen.py 2>/tmp/listener.err &\n",
        "for i in $(seq 100); do [ -e /tmp/listening ] && break; sleep 0.1; done\n",
        "echo @@listener; cat /tmp/listener.err\n",
    ]
    lines += [_run(f"untimed-{name}", name) for name in WARM]  # each path once, untimed
    for r in range(rounds):
        order = WARM[r % len(WARM) :] + WARM[: r % len(WARM)]
        lines += [_run(name, name) for name in order]
    return "".join(lines)


def run_kernel(env: Env, kernel: str, rounds: int, icount: int) -> list[dict[str, Any]]:
    cold: dict[str, list[float]] = {name: [] for name in COLD}
    warnings: dict[str, list[str]] = {}
    for pair in range(2):
        for name in COLD:
            vm = env.vm(kernel, f"notify-cold-{name}-{pair}")
            with_icount(vm, icount)
            results = boot_checked(vm, cold_script(name)).results
            t = Timings.parse(results)
            cold[name] += [s - t.null() for s in t.seconds(f"cold-{name}")]
            warnings.update(_warnings(results))
    vm = env.vm(kernel, "notify-warm")
    with_icount(vm, icount)
    boot = boot_checked(vm, warm_script(rounds))
    t = Timings.parse(boot.results)
    warm = {name: [s - t.null() for s in t.seconds(name)] for name in WARM}
    warnings.update(_warnings(boot.results))
    log(f"{kernel}: cold {cold}, warm medians { {k: median(v) for k, v in warm.items()} }")
    return [
        {
            "kernel": kernel,
            "icount": icount,
            "rounds": rounds,
            "cold": cold,
            "warm": warm,
            "failures": t.failures(),
            "warnings": warnings,
        }
    ]


def _warnings(text: str) -> dict[str, list[str]]:
    return {
        label: [line for line in section.splitlines() if "vmm.notify_socket" in line]
        for label, section in _sections(text).items()
    }


def _sections(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    label = None
    for line in text.splitlines():
        if line.startswith("@@err ") or line == "@@listener":
            label = line.removeprefix("@@err ").removeprefix("@@")
            out[label] = ""
        elif label is not None and not line.startswith("@@"):
            out[label] += line + "\n"
    return out


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| kernel | variant | median | over `off` |",
        "|---|---|---|---|",
    ]
    for r in results:
        cold_off = median(r["cold"]["off"])
        for name in COLD:
            m = median(r["cold"][name])
            rows.append(
                f"| {r['kernel']} | cold `{name}` | {m * 1000:.1f} ms | {(m - cold_off) * 1000:+.1f} ms |"
            )
        warm_off = median(r["warm"]["off"])
        for name in WARM:
            m = median(r["warm"][name])
            rows.append(
                f"| {r['kernel']} | warm `{name}` | {m * 1000:.1f} ms | {(m - warm_off) * 1000:+.1f} ms |"
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default="6.12,6.1")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--icount", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("notify_cost.json"))
    args = parser.parse_args()

    def one(env: Env, kernel: str) -> list[dict[str, Any]]:
        return run_kernel(env, kernel, args.rounds, args.icount)

    code = run_kernels(args.kernels, "ga-notify-", one, args.json, table)
    for r in json.loads(args.json.read_text()):
        print(f"{r['kernel']}: failures {r['failures']}; warnings {r['warnings']}")
    return code


if __name__ == "__main__":
    sys.exit(main())

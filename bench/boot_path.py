"""Benchmark 1, the boot path: `guest-agent mount-all` against a busybox shell script.

One guest boot with 8 shares (5 virtio-9p, 3 virtio-fs), the `ro-store` 9p
share, an ext4 store volume (found by LABEL) and the /nix/store overlay. The
agent reads them from the kernel command line, as at a real boot. The shell
script does the same mounts with busybox `mount`, with exactly the options the
agent uses (taken from the agent's own `mount-all --dry-run` on the host, and
checked afterwards against /proc/self/mountinfo of both runs).

Modules: the first run of the boot (the agent, untimed for the ratio) loads
every module both sides need (virtio_blk, 9p, 9pnet_virtio, virtiofs, overlay,
ext4's dependencies); then one untimed shell run; then N timed rounds, each
round both sides in alternating order (agent first in odd rounds, shell first
in even ones), with everything unmounted (reverse order) and synced between
runs. The agent's cold first run is reported beside, for information.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import REPO_ROOT, Env, Timings, boot_checked, log, median, tb

NINEP_SHARES = [f"s{i}" for i in range(5)]
VIRTIOFS_SHARES = [f"s{i}" for i in range(5, 8)]
#: Everything a mount-all of this configuration imports from the agent.
IMPORTS = (
    "import guest_agent.cli, guest_agent.commands, guest_agent.config, guest_agent.plan, "
    "guest_agent.execute, guest_agent.kmod, guest_agent.uevent, guest_agent.sysfs, guest_agent.probe"
)
_WOULD = re.compile(r"^would-mount (\S+) (\S+) at (\S+) \((.*)\)$")


def agent_cmdline() -> str:
    keys = [f"microvm.share={t}:/mnt/{t}:9p" for t in NINEP_SHARES]
    keys += [f"microvm.share={t}:/mnt/{t}:virtiofs" for t in VIRTIOFS_SHARES]
    keys += [
        "microvm.share=ro-store:/nix/.ro-store:9p",
        "microvm.volume=LABEL=rw-store:/nix/.rw-store:ext4",
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store",
    ]
    return " ".join(keys)


def agent_plan(cmdline: str, workdir: Path) -> list[tuple[str, str, str, str]]:
    """(fstype, source, where, options) of each mount, in the agent's order (its dry run)."""
    cl = workdir / "cmdline"
    cl.write_text(cmdline + "\n")
    empty = workdir / "empty.json"
    empty.write_text("{}\n")
    out = subprocess.run(
        [sys.executable, "-m", "guest_agent", "mount-all", "--dry-run", "--cmdline", str(cl),
         "--config", str(empty)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    plan = []
    for line in out.stderr.splitlines() + out.stdout.splitlines():
        m = _WOULD.match(line.strip())
        if m:
            plan.append((m.group(1), m.group(2), m.group(3), m.group(4)))
    if len(plan) != 11:
        raise RuntimeError(f"unexpected dry-run plan:\n{out.stderr}{out.stdout}")
    return plan


def shell_script(plan: list[tuple[str, str, str, str]]) -> str:
    """A hand-written-style busybox mount script doing the plan's mounts."""
    lines = ["#!/bin/sh", "set -e"]
    for fstype, source, where, options in plan:
        if fstype == "overlay":
            opts = dict(o.split("=", 1) for o in options.split(",") if "=" in o)
            lines.append(f"mkdir -p {opts['upperdir']} {opts['workdir']}")
        lines.append(f"mkdir -p {where}")
        o = f" -o {shlex.quote(options)}" if options else ""
        lines.append(f"mount -t {fstype}{o} {shlex.quote(source)} {where}")
    return "\n".join(lines) + "\n"


def guest_script(plan: list[tuple[str, str, str, str]], rounds: int) -> str:
    points = " ".join(where for *_, where, _ in reversed(plan))
    return f"""
IMPORTS='{IMPORTS}'
agent() {{ guest-agent mount-all >/tmp/agent.log 2>&1; }}
shellmounts() {{ sh /bench/mounts.sh >/tmp/shell.log 2>&1; }}
unmount_all() {{
    for m in {points}; do umount "$m" || echo "umount $m failed"; done
    sync
}}
show() {{ echo "@@mounts $1@@"; grep -E ' (9p|virtiofs|ext4|overlay) ' /proc/self/mountinfo; echo "@@end@@"; }}
timeit cold-agent agent || {{ cat /tmp/agent.log; exit 1; }}
echo "@@agentlog@@"; cat /tmp/agent.log; echo "@@end@@"
show agent
unmount_all
timeit warm-shell shellmounts || {{ cat /tmp/shell.log; exit 1; }}
show shell
unmount_all
i=1
while [ $i -le {rounds} ]; do
    if [ $((i % 2)) -eq 1 ]; then
        timeit agent agent || cat /tmp/agent.log; unmount_all
        timeit shell shellmounts || cat /tmp/shell.log; unmount_all
    else
        timeit shell shellmounts || cat /tmp/shell.log; unmount_all
        timeit agent agent || cat /tmp/agent.log; unmount_all
    fi
    i=$((i + 1))
done
# Diagnostics (not part of the ratio): where the agent's time goes in the guest.
for i in 1 2 3; do
    timeit py-bare python3 -c pass
    timeit py-imports python3 -c "$IMPORTS"
    timeit agent-help sh -c "guest-agent --help >/dev/null"
done
python3 -X importtime -m guest_agent mount-all 2>/tmp/imp >/dev/null
echo "@@importtime@@"; grep 'import time' /tmp/imp; echo "@@end@@"
unmount_all
python3 -m cProfile -o /tmp/prof -m guest_agent mount-all >/dev/null 2>&1
unmount_all
echo "@@profile@@"
python3 -c "import pstats; pstats.Stats('/tmp/prof').sort_stats('cumulative').print_stats(35)" | sed -e 's#/usr/lib/python3[^ ]*/##'
echo "@@end@@"
"""


def _section(text: str, name: str) -> str:
    m = re.search(rf"^@@{name}@@\n(.*?)^@@end@@", text, re.S | re.M)
    return m.group(1) if m else ""


def _mounts_section(text: str, name: str) -> list[tuple[str, str, str]]:
    m = re.search(rf"^@@mounts {name}@@\n(.*?)^@@end@@", text, re.S | re.M)
    rows = []
    for line in (m.group(1) if m else "").splitlines():
        left, _, right = line.partition(" - ")
        f, t = left.split(), right.split()
        # mount point, fstype, mount options + super options without per-boot noise
        # overlayfs shows uuid=on once it has stored a uuid in a fresh upper layer
        # (the first mount of the boot): a kernel detail, not an option either side gave.
        supers = ",".join(sorted(o for o in t[2].split(",") if not o.startswith("uuid=")))
        rows.append((f[4], t[0], f"{f[5]} {supers}"))
    return sorted(rows)


def run(env: Env, kernel: str, rounds: int) -> dict[str, Any]:
    work = env.workdir / f"boot-path-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    cmdline = agent_cmdline()
    plan = agent_plan(cmdline, work)
    script = shell_script(plan)
    shares = []
    for tag in ["ro-store", *NINEP_SHARES, *VIRTIOFS_SHARES]:
        d = work / "shares" / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "hello").write_text(f"{tag}\n")
        proto = "virtiofs" if tag in VIRTIOFS_SHARES else "9p"
        shares.append(tb.Share(tag, d, proto, readonly=(tag == "ro-store")))
    rw = tb.ext4_image(work / "rw-store.img", "256M", label="rw-store")
    vm = env.vm(kernel, "boot-path", shares=shares, disks=[tb.Disk(rw, serial="rw")],
                cmdline=cmdline, timeout=300 + 60 * rounds)
    log(f"boot path on {kernel}: {rounds} rounds")
    r = boot_checked(vm, guest_script(plan, rounds), files={"bench/mounts.sh": script})
    t = Timings.parse(r.results)
    agent_m, shell_m = _mounts_section(r.results, "agent"), _mounts_section(r.results, "shell")
    agent, shell = t.seconds("agent"), t.seconds("shell")
    ratios = [a / s for a, s in zip(agent, shell, strict=True)]
    return {
        "kernel": kernel,
        "rounds": rounds,
        "agent": agent,
        "shell": shell,
        "ratios": ratios,
        "ratio_median": median(ratios),
        "agent_median": median(agent),
        "shell_median": median(shell),
        "cold_agent": t.seconds("cold-agent"),
        "warm_shell": t.seconds("warm-shell"),
        "null": t.null(),
        "failures": t.failures(),
        "same_mounts": agent_m == shell_m and len(agent_m) == 11,
        "mounts_agent": agent_m,
        "mounts_shell": shell_m,
        "shell_script": script,
        "cmdline": cmdline,
        "boot_seconds": r.duration,
        "py_bare": t.seconds("py-bare"),
        "py_imports": t.seconds("py-imports"),
        "agent_help": t.seconds("agent-help"),
        "guest_importtime": _section(r.results, "importtime"),
        "guest_profile": _section(r.results, "profile"),
    }

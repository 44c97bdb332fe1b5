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
from pathlib import Path
from typing import Any

from common import (
    REPO_ROOT,
    Env,
    Timings,
    agent_dry_run,
    boot_checked,
    comparable,
    log,
    median,
    tb,
)

NINEP_SHARES = [f"s{i}" for i in range(5)]
VIRTIOFS_SHARES = [f"s{i}" for i in range(5, 8)]


def agent_modules() -> list[str]:
    """The agent's modules a boot-path mount-all imports (diagnostics: timed as one import).

    Those a host dry run imports, plus the discovery and loading modules a real run
    adds when they exist."""
    out = agent_dry_run(agent_cmdline(), "-X", "importtime")
    mods = {
        line.split("|")[-1].strip() for line in out.stderr.splitlines() if "import time:" in line
    }
    mods = {m for m in mods if m.startswith("guest_agent.") and m != "guest_agent.__main__"}
    for extra in ("kmod", "uevent", "sysfs", "probe", "reset"):
        if (REPO_ROOT / "guest_agent" / f"{extra}.py").exists():
            mods.add(f"guest_agent.{extra}")
    return sorted(mods)


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


def agent_plan(cmdline: str) -> list[tuple[str, str, str, str]]:
    """(fstype, source, where, options) of each mount, in the agent's order (its dry run)."""
    out = agent_dry_run(cmdline, check=True)
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


def floor_script(plan: list[tuple[str, str, str, str]]) -> str:
    """bench/guest_floor.py with the plan filled in (LABEL=rw-store is /dev/vda, the only disk)."""
    resolved = [(f, "/dev/vda" if src == "LABEL=rw-store" else src, w, o) for f, src, w, o in plan]
    text = (Path(__file__).parent / "guest_floor.py").read_text()
    marker = "PLAN: list = []  # filled in by boot_path.py"
    assert marker in text
    return text.replace(marker, f"PLAN = {resolved!r}")


def guest_script(plan: list[tuple[str, str, str, str]], rounds: int, modules: list[str]) -> str:
    points = " ".join(where for *_, where, _ in reversed(plan))
    return rf"""
IMPORTS='import {", ".join(modules)}'
agent() {{ guest-agent mount-all >/tmp/agent.log 2>&1; }}
shellmounts() {{ sh /bench/mounts.sh >/tmp/shell.log 2>&1; }}
floormounts() {{ python3 /bench/floor.py >/tmp/floor.log 2>&1; }}
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
timeit warm-floor floormounts || {{ cat /tmp/floor.log; exit 1; }}
show floor
unmount_all
i=0
while [ $i -lt {rounds} ]; do
    case $((i % 3)) in
        0) order="agent shell floor" ;;
        1) order="shell floor agent" ;;
        2) order="floor agent shell" ;;
    esac
    for what in $order; do
        case $what in
            agent) timeit agent agent || cat /tmp/agent.log ;;
            shell) timeit shell shellmounts || cat /tmp/shell.log ;;
            floor) timeit floor floormounts || cat /tmp/floor.log ;;
        esac
        unmount_all
    done
    i=$((i + 1))
done
# Diagnostics (not part of the ratio): where the agent's time goes in the guest.
for i in 1 2 3; do
    timeit py-bare python3 -c pass
    timeit py-imports python3 -c "$IMPORTS"
    timeit agent-help sh -c "guest-agent --help >/dev/null"
done
for i in 1 2 3; do
    python3 -X importtime /usr/bin/guest-agent mount-all 2>/tmp/imp >/dev/null
    echo "@@importtime$i@@"; grep 'import time' /tmp/imp; echo "@@end@@"
    unmount_all
done
python3 -m cProfile -o /tmp/prof /usr/bin/guest-agent mount-all >/dev/null 2>&1
unmount_all
echo "@@profile@@"
python3 -c "
import pstats
s = pstats.Stats('/tmp/prof')
s.sort_stats('cumulative').print_stats('guest_agent', 40)
s.sort_stats('tottime').print_stats(25)
" | sed -e 's#/usr/lib/python3[^ ]*/##g' | grep -v '^ *$\|Ordered by\|List reduced\|function calls'
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
    return sorted(comparable(rows))


#: What a hand-written initrd fragment loads for these mounts (and virtio_pci, see cold_script).
COLD_MODULES = "virtio_blk 9pnet_virtio 9p virtiofs overlay ext4"


def cold_script(script: str) -> str:
    """The busybox script for a cold boot: modprobe first, shares retried."""
    # Right after modprobe a share's channel may not be registered yet (the race behind
    # microvm.nix's "tag not found"): like a careful hand-written script, retry each share's
    # mount every 10 ms (for up to 10 s).
    lines = []
    for line in script.splitlines()[1:]:
        if line.startswith(("mount -t 9p", "mount -t virtiofs")):
            line = (
                f"n=0; until {line} 2>/dev/null; do n=$((n + 1)); "
                "[ $n -gt 1000 ] && { " + line + "; exit 1; }; usleep 10000; done"
            )
        lines.append(line)
    return (
        "#!/bin/sh\nset -e\n"
        "# virtio_pci is built into Debian's 6.12, a module in 6.1\n"
        "[ -d /sys/bus/pci/drivers/virtio-pci ] || modprobe virtio_pci\n"
        "modprobe -a " + COLD_MODULES + "\n" + "\n".join(lines) + "\n"
    )


def run_cold(vm: tb.VM, script: str, boots: int) -> dict[str, list[float]]:
    """Cold boots: the first mount run of a boot, modules not loaded yet; agent and shell
    alternate as the one that goes first (one sample per boot). The shell loads the
    modules itself with busybox `modprobe -a` (the agent coldplugs them) and retries
    share mounts until their channel is there."""
    return cold_boots(vm, cold_script(script), boots)[0]


def cold_boots(
    vm: tb.VM, cold: str, boots: int, label: str = ""
) -> tuple[dict[str, list[float]], list[float]]:
    """BOOTS cold boots each of the agent and of the shell script COLD, alternating: the
    seconds of each side, and every boot's duration (logged under LABEL when given)."""
    out: dict[str, list[float]] = {"agent": [], "shell": []}
    durations: list[float] = []
    for i in range(2 * boots):
        who = "agent" if i % 2 == 0 else "shell"
        cmd = (
            "guest-agent mount-all >/tmp/log 2>&1"
            if who == "agent"
            else "sh /bench/cold.sh >/tmp/log 2>&1"
        )
        r = boot_checked(
            vm,
            f"timeit cold sh -c '{cmd}' || {{ cat /tmp/log; exit 1; }}\n"
            "[ $(grep -cE ' (9p|virtiofs|ext4|overlay) ' /proc/self/mountinfo) -eq 11 ] || exit 1\n",
            files={"bench/cold.sh": cold},
        )
        out[who] += Timings.parse(r.results).seconds("cold")
        durations.append(r.duration)
        if label:
            log(f"{label} {who}: {out[who][-1]:.2f} s (boot {r.duration:.1f} s)")
    return out, durations


def make_vm(
    env: Env, kernel: str, name: str, work: Path, cmdline: str, rounds: int, **vm: Any
) -> tb.VM:
    """The benchmark's guest: the 8 shares and ro-store (each with a file), the ext4 store
    volume labelled rw-store; VM: more VM fields (e.g. machine=)."""
    shares = []
    for tag in ["ro-store", *NINEP_SHARES, *VIRTIOFS_SHARES]:
        d = work / "shares" / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "hello").write_text(f"{tag}\n")
        proto = "virtiofs" if tag in VIRTIOFS_SHARES else "9p"
        shares.append(tb.Share(tag, d, proto, readonly=(tag == "ro-store")))
    rw = tb.ext4_image(work / "rw-store.img", "256M", label="rw-store")
    return env.vm(
        kernel,
        name,
        shares=shares,
        disks=[tb.Disk(rw, serial="rw")],
        cmdline=cmdline,
        timeout=300 + 60 * rounds,
        **vm,
    )


def run(
    env: Env, kernel: str, rounds: int, cold_boots: int = 3, cold_icount: int | None = None
) -> dict[str, Any]:
    """The warm rounds in one boot, COLD_BOOTS cold boots per side on the host's clock and,
    with COLD_ICOUNT, as many again under qemu `-icount shift=COLD_ICOUNT` (the guest's
    clock counts instructions: what a host without emulation would weigh)."""
    work = env.workdir / f"boot-path-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    cmdline = agent_cmdline()
    plan = agent_plan(cmdline)
    script = shell_script(plan)
    vm = make_vm(env, kernel, "boot-path", work, cmdline, rounds)
    log(f"boot path on {kernel}: {rounds} rounds")
    floor = floor_script(plan)
    r = boot_checked(
        vm,
        guest_script(plan, rounds, agent_modules()),
        files={"bench/mounts.sh": script, "bench/floor.py": floor},
    )
    t = Timings.parse(r.results)
    log(f"boot path on {kernel}: {cold_boots} cold boots each")
    cold = run_cold(vm, script, cold_boots)
    cold_counted = None
    if cold_icount is not None:
        from compare import with_icount

        counted_vm = make_vm(env, kernel, "boot-path-icount", work, cmdline, rounds)
        with_icount(counted_vm, cold_icount)
        log(f"boot path on {kernel}: {cold_boots} cold boots each, -icount shift={cold_icount}")
        cold_counted = run_cold(counted_vm, script, cold_boots)
    agent_m, shell_m = _mounts_section(r.results, "agent"), _mounts_section(r.results, "shell")
    floor_m = _mounts_section(r.results, "floor")
    agent, shell, fl = t.seconds("agent"), t.seconds("shell"), t.seconds("floor")
    ratios = [a / s for a, s in zip(agent, shell, strict=True)]
    floor_ratios = [f / s for f, s in zip(fl, shell, strict=True)]
    return {
        "kernel": kernel,
        "rounds": rounds,
        "agent": agent,
        "shell": shell,
        "ratios": ratios,
        "ratio_median": median(ratios),
        "agent_median": median(agent),
        "shell_median": median(shell),
        "floor": fl,
        "floor_ratios": floor_ratios,
        "floor_ratio_median": median(floor_ratios),
        "floor_median": median(fl),
        "floor_same_mounts": floor_m == shell_m,
        "floor_script": floor,
        "cold_agent": t.seconds("cold-agent"),
        "cold_boots": cold,
        "cold_ratio": median(cold["agent"]) / median(cold["shell"]),
        "cold_icount": cold_icount,
        "cold_boots_icount": cold_counted,
        "cold_ratio_icount": (
            median(cold_counted["agent"]) / median(cold_counted["shell"]) if cold_counted else None
        ),
        "cold_script": cold_script(script),
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
        "imported_modules": agent_modules(),
        "agent_help": t.seconds("agent-help"),
        "guest_importtime": [_section(r.results, f"importtime{i}") for i in (1, 2, 3)],
        "guest_profile": _section(r.results, "profile"),
    }

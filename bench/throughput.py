"""Benchmark 4, share throughput: the agent's 9p defaults against microvm.nix's options.

One guest boot with two 9p shares holding the same content (a 64 MiB file and
1 000 files of 4 KiB): `ro-store` (exported read-only, the store overlay's
lower layer) and `data` (read-write). The agent mounts both first (with a
small ext4 volume for the overlay, so that ro-store is the store's lower layer
and gets the store defaults); its mount table is kept for the report and the
mounts undone. Then each variant is mounted with busybox `mount -t 9p -o
OPTIONS`, measured and unmounted, rotating the order of the variants in each
repetition.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from common import Env, Timings, agent_dry_run, boot_checked, log, median, tb

NIX = "trans=virtio,version=9p2000.L,msize=65536"
AGENT_CMDLINE = (
    "microvm.share=ro-store:/nix/.ro-store:9p microvm.share=data:/mnt/data:9p "
    "microvm.volume=SERIAL=rw:/nix/.rw-store:ext4 "
    "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
)
_WOULD = re.compile(r"^would-mount 9p (\S+) at \S+ \((.*)\)$")


def agent_options() -> dict[str, str]:
    """tag -> the 9p options the agent uses (its own --dry-run)."""
    out = agent_dry_run(AGENT_CMDLINE, check=True)
    found = {}
    for line in (out.stderr + out.stdout).splitlines():
        m = _WOULD.match(line.strip())
        if m:
            found[m.group(1)] = m.group(2)
    return found


def variants() -> list[tuple[str, str, str]]:
    """(share, name, options)."""
    opts = agent_options()
    ro, rw = opts["ro-store"], opts["data"]
    base = "trans=virtio,version=9p2000.L"
    return [
        ("ro-store", "microvm.nix", NIX),
        ("ro-store", "agent", ro),
        (
            "ro-store",
            "msize=131072 (kernel default), cache=loose",
            f"{base},msize=131072,cache=loose,ro",
        ),
        ("ro-store", "msize=262144, cache=loose", f"{base},msize=262144,cache=loose,ro"),
        ("ro-store", "msize=512000, no cache", f"{base},msize=512000,ro"),
        ("rw", "microvm.nix", NIX),
        ("rw", "agent", rw),
        ("rw", "msize=512000, cache=none", f"{base},msize=512000,cache=none"),
        ("rw", "msize=131072 (kernel default), cache=mmap", f"{base},msize=131072,cache=mmap"),
        ("rw", "msize=131072, cache=none", f"{base},msize=131072,cache=none"),
    ]


def _content(d: Path) -> Path:
    if (d / "small").is_dir():
        return d
    (d / "small").mkdir(parents=True)
    with (d / "big").open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    for i in range(1000):
        (d / "small" / f"f{i:04d}").write_bytes(os.urandom(4096))
    return d


def guest_script(vs: list[tuple[str, str, str]], reps: int) -> str:
    lines = [
        "bigread() { dd if=/mnt/b/big of=/dev/null bs=1M 2>/dev/null; }",
        "smallread() { cat /mnt/b/small/* >/dev/null && ls -l /mnt/b/small >/dev/null; }",
        "guest-agent mount-all >/tmp/agent.log 2>&1 || { cat /tmp/agent.log; exit 1; }",
        "echo @@agentmounts@@; grep ' 9p ' /proc/self/mountinfo; echo @@end@@",
        "umount /nix/store /nix/.rw-store /nix/.ro-store /mnt/data",
        "mkdir -p /mnt/b",
        # warm-up: the host's page cache and the guest's modules
        f"mount -t 9p -o {NIX} ro-store /mnt/b && bigread && smallread && umount /mnt/b",
        f"mount -t 9p -o {NIX} data /mnt/b && bigread && smallread && umount /mnt/b",
    ]
    for rep in range(reps):
        k = rep % len(vs)
        order = list(range(len(vs)))[k:] + list(range(len(vs)))[:k]
        for i in order:
            share, _, opts = vs[i]
            tag = "ro-store" if share == "ro-store" else "data"
            lines += [
                f"mount -t 9p -o {opts} {tag} /mnt/b || exit 1",
                f"[ {rep} -eq 0 ] && {{ echo @@variant {i}@@; grep ' /mnt/b ' /proc/self/mountinfo; echo @@end@@; }}",
                "dropcaches",
                f"timeit v{i}.big1 bigread",
                f"timeit v{i}.big2 bigread",
                "dropcaches",
                f"timeit v{i}.small1 smallread",
                f"timeit v{i}.small2 smallread",
                "umount /mnt/b",
            ]
    return "\n".join(lines) + "\n"


def _section(text: str, name: str) -> str:
    m = re.search(rf"^@@{re.escape(name)}@@\n(.*?)^@@end@@", text, re.S | re.M)
    return m.group(1) if m else ""


def _supers(line: str) -> str:
    right = line.partition(" - ")[2].split()
    return ",".join(sorted(right[2].split(","))) if len(right) > 2 else ""


def run(env: Env, kernel: str, reps: int) -> dict[str, Any]:
    work = env.workdir / f"throughput-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    ro = _content(env.workdir / "tp-content" / "ro-store")
    rw = _content(env.workdir / "tp-content" / "data")
    vol = tb.ext4_image(work / "rw.img", "64M")
    vs = variants()
    vm = env.vm(
        kernel,
        "throughput",
        shares=[tb.Share("ro-store", ro, "9p", readonly=True), tb.Share("data", rw, "9p")],
        disks=[tb.Disk(vol, serial="rw")],
        cmdline=AGENT_CMDLINE,
        timeout=300 + 240 * reps,
    )
    log(f"throughput on {kernel}: {len(vs)} variants x {reps}")
    r = boot_checked(vm, guest_script(vs, reps))
    t = Timings.parse(r.results)
    agent_mi = _section(r.results, "agentmounts")
    # The agent variant's mount must match the agent's own mount of the same share.
    agent_supers = {}
    for line in agent_mi.splitlines():
        src = line.partition(" - ")[2].split()
        if len(src) > 1:
            agent_supers[src[1]] = _supers(line)
    out_variants = []
    for i, (share, name, opts) in enumerate(vs):
        mi = _section(r.results, f"variant {i}").strip()
        tag = "ro-store" if share == "ro-store" else "data"
        out_variants.append(
            {
                "share": share,
                "name": name,
                "options": opts,
                "mountinfo": mi,
                "matches_agent": (_supers(mi) == agent_supers.get(tag))
                if name == "agent"
                else None,
                **{m: t.seconds(f"v{i}.{m}") for m in ("big1", "big2", "small1", "small2")},
            }
        )
    summary = {}
    for share in ("ro-store", "rw"):
        nix = next(v for v in out_variants if v["share"] == share and v["name"] == "microvm.nix")
        ag = next(v for v in out_variants if v["share"] == share and v["name"] == "agent")
        summary[share] = {
            "big_nix": median(nix["big1"]),
            "big_agent": median(ag["big1"]),
            "big_speedup": median(nix["big1"]) / median(ag["big1"]),
            "big2_speedup": median(nix["big2"]) / median(ag["big2"]),
            "small_nix": median(nix["small1"]),
            "small_agent": median(ag["small1"]),
            "small_speedup": median(nix["small1"]) / median(ag["small1"]),
            "small2_speedup": median(nix["small2"]) / median(ag["small2"]),
            "agent_options_match": ag["matches_agent"],
        }
    return {
        "kernel": kernel,
        "reps": reps,
        "variants": out_variants,
        "summary": summary,
        "agent_mountinfo": agent_mi,
        "null": t.null(),
        "failures": t.failures(),
        "boot_seconds": r.duration,
    }

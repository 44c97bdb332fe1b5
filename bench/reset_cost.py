"""Benchmark 3, reset cost against the size of the upper layer.

For each size N and repetition, a fresh ext4 image made on the host with
`mkfs.ext4 -d` holds `store/` (the upper layer: N empty files in directories
of 1 000), an empty `work/`, and `copy/`, a second copy of the same tree. All
images are attached to ONE guest (virtio-blk, serial rN-REP); for each, in an
order that interleaves the sizes:

1. drop caches; time `guest-agent mount-all --cmdline FILE` where FILE holds
   the ro-store share, the volume by SERIAL=, the overlay and
   `microvm.reset-overlay` (the boot-critical cost);
2. time until the agent's background deletion of the moved-aside tree is done
   (the trash directory is empty; polled every 0.1 s);
3. drop caches; time `rm -rf copy/` on the same volume (what a shell fragment
   does before mounting the overlay);
4. check the upper layer is empty, unmount.

A first, untimed run on a small extra volume loads the modules.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from common import Env, Timings, boot_checked, log, tb

SIZES = (0, 10_000, 100_000)
PER_DIR = 1000


def _tree(root: Path, n: int) -> Path:
    done = root / ".done"
    if done.exists():
        return root
    for part in ("store", "copy"):
        base = root / part
        base.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            d = base / f"{i // PER_DIR:05d}-pkg"
            if i % PER_DIR == 0:
                d.mkdir(exist_ok=True)
            (d / f"f{i % PER_DIR:04d}").touch()
    (root / "work").mkdir(exist_ok=True)
    done.touch()
    return root


def _image(path: Path, tree: Path, n: int) -> Path:
    tb.blank_image(path, "1G")
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-N",
            str(2 * n + 8192),
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
            str(tree),
            str(path),
        ],
        check=True,
        env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"},
    )
    return path


def guest_script(runs: list[tuple[str, int]]) -> str:
    lines = [
        r"""
CL='microvm.share=ro-store:/nix/.ro-store:9p microvm.store-overlay=/nix/.ro-store:/nix/.rw-store microvm.reset-overlay'
agent() { guest-agent mount-all --cmdline "$1" >/tmp/agent.log 2>&1; }
waittrash() {
    while [ -n "$(ls -A /nix/.rw-store/.guest-agent-trash 2>/dev/null)" ]; do usleep 100000; done
}
unmount_all() {
    umount /nix/store || echo "umount /nix/store failed"
    n=0
    # the background deletion holds the volume (its cwd) until it exits
    until umount /nix/.rw-store 2>/dev/null; do
        n=$((n + 1)); [ $n -gt 600 ] && { echo "umount /nix/.rw-store failed"; break; }
        usleep 100000
    done
    umount /nix/.ro-store || echo "umount /nix/.ro-store failed"
}
one() {  # one SERIAL N
    echo "$CL microvm.volume=SERIAL=$1:/nix/.rw-store:ext4" >/tmp/cl.$1
    dropcaches
    timeit a.$2 agent /tmp/cl.$1 || { cat /tmp/agent.log; exit 1; }
    grep -q 'reset the /nix/store upper layer' /tmp/agent.log || { echo "no reset: $(cat /tmp/agent.log)"; exit 1; }
    timeit t.$2 waittrash
    dropcaches
    timeit rm.$2 rm -rf /nix/.rw-store/copy
    echo "@@check $1 upper=$(ls -A /nix/.rw-store/store | wc -l) copy=$(ls -d /nix/.rw-store/copy 2>/dev/null | wc -l)@@"
    unmount_all
}
echo "$CL microvm.volume=SERIAL=warm:/nix/.rw-store:ext4" >/tmp/cl.warm
agent /tmp/cl.warm || { cat /tmp/agent.log; exit 1; }
waittrash; unmount_all
"""
    ]
    for serial, n in runs:
        lines.append(f"one {serial} {n}")
    return "\n".join(lines) + "\n"


def run(env: Env, kernel: str, reps: int, sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    work = env.workdir / f"reset-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    lower = env.workdir / "reset-lower"
    lower.mkdir(exist_ok=True)
    (lower / "aaa-lower").write_text("lower\n")
    warm_tree = _tree(env.workdir / "reset-trees" / "warm", 10)
    disks = [tb.Disk(_image(work / "warm.img", warm_tree, 10), serial="warm")]
    runs: list[tuple[str, int]] = []
    for rep in range(reps):
        order = list(sizes[rep % len(sizes) :]) + list(sizes[: rep % len(sizes)])
        for n in order:
            serial = f"r{n}-{rep}"
            log(f"reset: image with {n} files ({serial})")
            tree = _tree(env.workdir / "reset-trees" / str(n), n)
            disks.append(tb.Disk(_image(work / f"{serial}.img", tree, n), serial=serial))
            runs.append((serial, n))
    vm = env.vm(
        kernel,
        "reset",
        shares=[tb.Share("ro-store", lower, "9p", readonly=True)],
        disks=disks,
        timeout=600 + 600 * reps,
    )
    log(f"reset cost on {kernel}: sizes {sizes} x {reps}")
    r = boot_checked(vm, guest_script(runs))
    t = Timings.parse(r.results)
    checks = [line for line in r.results.splitlines() if line.startswith("@@check")]
    bad = [c for c in checks if "upper=0 copy=0" not in c]
    if bad or len(checks) != len(runs):
        raise RuntimeError(f"reset benchmark: unexpected state after a run: {bad or checks}\n{r}")
    for serial, _ in runs:
        (work / f"{serial}.img").unlink(missing_ok=True)
    return {
        "kernel": kernel,
        "reps": reps,
        "sizes": list(sizes),
        "rows": {
            str(n): {
                "agent": t.seconds(f"a.{n}"),
                "trash": t.seconds(f"t.{n}"),
                "rm": t.seconds(f"rm.{n}"),
            }
            for n in sizes
        },
        "null": t.null(),
        "failures": t.failures(),
        "boot_seconds": r.duration,
    }

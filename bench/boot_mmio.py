#!/usr/bin/env python3
"""Cold-boot comparison on both virtio transports: the agent against a shell script.

The cold boots of benchmark 1 (bench/boot_path.py: 8 shares, the 9p `ro-store`, an
ext4 store volume by LABEL and the /nix/store overlay; the first mount run of a boot,
with no module loaded), once on qemu's q35 machine (virtio-pci) and once on its
microvm machine (virtio-mmio). The shell side is a careful hand-written initrd
fragment: the transport's module (`virtio_pci` or `virtio_mmio`, when not built in),
`modprobe -a` of the drivers and filesystems, share mounts retried until their
channel is there. The agent coldplugs everything itself. Agent and shell alternate
as the one measured in each boot (one sample per boot).

    python3 bench/boot_mmio.py --kernels 6.12,6.1 --boots 3 --json /tmp/mmio.json

Needs the VM test bed and root, like bench/run.py; not part of the test suite and
not (yet) part of docs/benchmarks.md: it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot_path import (
    COLD_MODULES,
    agent_cmdline,
    agent_plan,
    cold_boots,
    cold_script,
    shell_script,
)
from boot_path import (
    make_vm as boot_path_vm,
)
from common import Env, median, run_kernels, tb

MACHINES = ("q35", "microvm")


def cold_script_for(machine: str, script: str) -> str:
    """boot_path's cold script, with the transport module of MACHINE loaded first."""
    text = cold_script(script)
    if machine == "q35":
        return text
    pci = "[ -d /sys/bus/pci/drivers/virtio-pci ] || modprobe virtio_pci\n"
    assert pci in text
    return text.replace(
        pci, "[ -d /sys/bus/platform/drivers/virtio-mmio ] || modprobe virtio_mmio\n"
    )


def make_vm(env: Env, kernel: str, machine: str, work: Path, cmdline: str) -> tb.VM:
    """boot_path's guest on MACHINE."""
    return boot_path_vm(env, kernel, f"cold-{machine}", work, cmdline, 0, machine=machine)


def run(env: Env, kernel: str, machine: str, boots: int) -> dict[str, Any]:
    work = env.workdir / f"cold-{machine}-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    cmdline = agent_cmdline()
    cold = cold_script_for(machine, shell_script(agent_plan(cmdline)))
    vm = make_vm(env, kernel, machine, work, cmdline)
    out, durations = cold_boots(vm, cold, boots, f"{kernel} {machine}")
    return {
        "kernel": kernel,
        "machine": machine,
        "transport": tb.transport(machine),
        "agent": out["agent"],
        "shell": out["shell"],
        "ratio": median(out["agent"]) / median(out["shell"]),
        "boot_seconds": durations,
        "cold_script": cold,
        "modules": COLD_MODULES,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| kernel | machine (transport) | agent, cold | shell, cold | agent / shell | whole boot |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['kernel']} | {r['machine']} ({r['transport']}) "
            f"| {median(r['agent']):.2f} s | {median(r['shell']):.2f} s "
            f"| **{r['ratio']:.1f}×** | {median(r['boot_seconds']):.1f} s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kernels", default="6.12,6.1")
    ap.add_argument("--machines", default=",".join(MACHINES))
    ap.add_argument("--boots", type=int, default=3, help="cold boots per side (default 3)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args(argv)
    return run_kernels(
        args.kernels,
        "ga-bench-mmio-",
        lambda env, kernel: [run(env, kernel, m, args.boots) for m in args.machines.split(",")],
        args.json,
        table,
    )


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Cold boots on a guest with two vCPUs: module loads in parallel (issue 11, goal 1).

The cold boots of benchmark 1 (bench/boot_path.py: 8 shares, the 9p `ro-store`, an
ext4 store volume by LABEL, the /nix/store overlay; the first mount run of a boot,
no module loaded) on a guest with `-smp 2` (qemu's multi-threaded TCG: each vCPU on
its own host thread). Three sides take turns as the one measured in a boot:

* agent:      `guest-agent mount-all`: on more than one CPU it hands the modules that
              do not depend on each other to the kernel at once (guest_agent.kmod.fanout)
* agent-1cpu: the same run pinned to one CPU (`taskset 1`): it then loads them one by
              one, as it did before and does on a one-vCPU guest (the before, same boot kind)
* shell:      boot_path's cold busybox script (`modprobe -a`, then the mounts)

Wall clock only: under `-icount` qemu runs the vCPUs in turn, so nothing can overlap
there. The host has two cores shared with qemu's I/O thread and the virtiofsd
daemons, so these ratios are what is left of the overlap after that contention.

    python3 bench/boot_smp.py --kernels 6.12,6.1 --boots 5 --json bench/boot_smp.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot_path import agent_cmdline, agent_plan, cold_script, shell_script
from boot_path import make_vm as boot_path_vm
from common import Env, Timings, boot_checked, log, median, run_kernels

CPUS = 2
SIDES = {
    "agent": "guest-agent mount-all",
    "agent-1cpu": "taskset 1 guest-agent mount-all",
    "shell": "sh /bench/cold.sh",
}
MOUNTS = "[ $(grep -cE ' (9p|virtiofs|ext4|overlay) ' /proc/self/mountinfo) -eq 11 ] || exit 1\n"


def run(env: Env, kernel: str, boots: int) -> dict[str, Any]:
    work = env.workdir / f"cold-smp-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    cmdline = agent_cmdline()
    cold = cold_script(shell_script(agent_plan(cmdline)))
    vm = boot_path_vm(env, kernel, "cold-smp", work, cmdline, 0, cpus=CPUS)
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    modules: dict[str, set[str]] = {}
    order = list(SIDES)
    for i in range(boots * len(SIDES)):
        side = order[i % len(order)]
        r = boot_checked(
            vm,
            f"[ $(grep -c ^processor /proc/cpuinfo) -eq {CPUS} ] || exit 1\n"
            f"timeit cold sh -c '{SIDES[side]} >/tmp/log 2>&1' || {{ cat /tmp/log; exit 1; }}\n"
            + MOUNTS
            + "echo @@modules@@; cut -d' ' -f1 /proc/modules | sort\n",
            files={"bench/cold.sh": cold},
        )
        seconds[side] += Timings.parse(r.results).seconds("cold")
        loaded = set(r.results.split("@@modules@@", 1)[1].split())
        if modules.setdefault(side, loaded) != loaded:
            raise RuntimeError(f"{side} loaded other modules this time: {sorted(loaded)}")
        log(f"{kernel} {side}: {seconds[side][-1]:.2f} s")
    if len({frozenset(m) for m in modules.values()}) != 1:
        raise RuntimeError(f"the sides loaded different modules: {modules}")
    return {
        "kernel": kernel,
        "cpus": CPUS,
        "boots": boots,
        "seconds": seconds,
        "modules": sorted(modules["agent"]),
        "agent_vs_shell": median(seconds["agent"]) / median(seconds["shell"]),
        "agent_1cpu_vs_shell": median(seconds["agent-1cpu"]) / median(seconds["shell"]),
        "parallel_vs_serial": median(seconds["agent"]) / median(seconds["agent-1cpu"]),
        "cold_script": cold,
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"| kernel ({CPUS} vCPUs) | agent | agent on 1 CPU | shell | agent / shell "
        "| agent on 1 CPU / shell | agent / agent on 1 CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["seconds"]
        lines.append(
            f"| {r['kernel']} | {median(s['agent']):.2f} s | {median(s['agent-1cpu']):.2f} s "
            f"| {median(s['shell']):.2f} s | **{r['agent_vs_shell']:.2f}×** "
            f"| {r['agent_1cpu_vs_shell']:.2f}× | {r['parallel_vs_serial']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kernels", default="6.12,6.1")
    ap.add_argument("--boots", type=int, default=5, help="cold boots per side (default 5)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args(argv)
    return run_kernels(
        args.kernels, "ga-bench-smp-", lambda env, k: [run(env, k, args.boots)], args.json, table
    )


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The demo: a writable Nix store overlay whose builds survive a reboot (`x-nix-db`).

Boots a guest under qemu (TCG) with the layout of a microvm.nix guest: the
read-only store as a 9p `ro-store` share (built on the host by real Nix, with
its registration for `regInfo=`), a virtiofs share (`home`) and an ext4 volume
for the overlay's upper layer and Nix's state. The guest runs real Nix.

Boot 1: guest-agent mounts everything at stage 1 and registers the lower
closure; the guest `nix-build`s two packages. Boot 2 (reboot): both are still
valid, `nix-store --verify --check-contents` is clean, a rebuild builds
nothing. Boot 3: the host rebuilt the lower store (a library gone, a package
new): the agent invalidates what left and what depended on it, registers what
came. Boot 4: the other choice, `microvm.reset-overlay`: upper layer and
database start empty. Needs the test bed (`tools/setup-testbed`, run by ./demo).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "vm"))

import nixstores as ns  # noqa: E402
import testbed as tb  # noqa: E402
from agent import AgentRun, run_agent  # noqa: E402

#: The guest's expression: two packages, one on the lower's nb-dep (which the host
#: drops in boot 3), one on nb-keep (which stays). Paths: guest files of each boot.
PACKAGES = "/demo/default.nix"
APP, TOOL = "/demo/app.nix", "/demo/tool.nix"
BUILD = f"nix-build --no-out-link {PACKAGES}"
VERIFY = ns.verify()
UPPER = "/nix/.rw-store/store"


def guest_files(low: ns.Lower) -> dict[str, str | bytes]:
    return {
        PACKAGES: "[ (import ./app.nix) (import ./tool.nix) ]\n",
        **ns.build_files(low.paths["dep"], name="demo-app-1.0", path=APP),
        **ns.build_files(low.paths["keep"], name="demo-tool-1.0", path=TOOL),
    }


def short(path: str) -> str:
    """A store path's name without its hash: nb-dep-1.0."""
    return path.removeprefix(ns.STORE + "/").split("-", 1)[1]


def commands(*lines: str) -> str:
    """Guest shell lines: each command a marked step (see nixstores.step)."""
    return ns.PREPARE + "".join(ns.step(f"c{i}", line) for i, line in enumerate(lines))


def show(run: AgentRun, lines: tuple[str, ...]) -> list[ns.Step]:
    """Print what the guest did: the agent's lines, the mount table, each command and
    its output. Returns the commands' steps."""
    print("=== stage 1: guest-agent mount-all ===")
    print(run.stderr)
    print(f"(exit status {run.rc}, {run.seconds or 0:.1f}s)")
    print("--- the mount table, as the guest kernel shows it (/proc/self/mountinfo) ---")
    for point, m in sorted(run.new_mounts().items()):
        if point.startswith(("/nix", "/home")):
            print(f"{point:16} {m.fstype:9} {m.source:14} {','.join(m.mount_options)}")
    found = ns.steps(run.boot.results)
    done = []
    for i, line in enumerate(lines):
        print(f"$ {line}")
        step = found.get(f"c{i}")
        if step is None:
            print("(did not run)")
            step = ns.Step(f"c{i}", "", None, None)
        else:
            print(step.output or "(no output)")
            print(f"(exit status {step.rc})")
        done.append(step)
    return done


class Judge:
    """The demo's own reading of each boot, printed as one line; any miss fails it."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, run: AgentRun, checks: dict[str, bool]) -> None:
        misses = [what for what, ok in checks.items() if not ok]
        if run.rc != 0 or run.boot.exit_code != 0:
            misses.insert(0, f"the boot did not finish cleanly: {run.boot}")
        self.failed += misses
        if misses:
            print("-> UNEXPECTED: " + "; ".join(misses))
        else:
            print("-> " + "; ".join(checks))
        print()


def building(step: ns.Step) -> bool:
    return any("building" in x or "will be built" in x for x in step.lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=tb.KERNELS, default=tb.KERNELS[-1])
    kernel = parser.parse_args().kernel
    start = time.monotonic()
    bed = tb.Testbed.from_env()
    bed.check()
    with tempfile.TemporaryDirectory(prefix="guest-agent-demo-") as tmp:
        work = Path(tmp)
        print(
            f"building the guest's initramfs (Linux {kernel}, busybox, python3.11, Nix 2.8, guest-agent)..."
        )
        initramfs = tb.base_initramfs(bed, kernel, tb.build_wheels(work / "wheels"), nix=True)
        print("building the lower stores on the host with Nix (cached after the first run)...")
        ready = time.monotonic()
        base, rebuilt = ns.base(bed), ns.rebuilt(bed)
        stores = time.monotonic() - ready
        home = work / "home"
        home.mkdir()
        (home / "notes.txt").write_text("shared with the host over virtiofs\n")
        rw = tb.ext4_image(work / "rw-store.img", "128M", label="rw-store")

        def vm(low: ns.Lower) -> tb.VM:
            args = ns.store_vm_args(low, rw, "9p", "x-nix-db")
            return tb.VM(
                testbed=bed,
                kernel=kernel,
                initramfs=initramfs,
                workdir=work / f"vm-{low.name}",
                cmdline=f"microvm.share=home:/home {args['cmdline']}",
                shares=[*cast(list[tb.Share], args["shares"]), tb.Share("home", home, "virtiofs")],
                disks=cast(list[tb.Disk], args["disks"]),
                memory_mb=1024,
                timeout=240.0,
                label="demo",
            )

        def boot(
            machine: tb.VM, *lines: str, extra_cmdline: str = ""
        ) -> tuple[AgentRun, list[ns.Step]]:
            run = run_agent(
                machine,
                after=commands(*lines),
                extra_cmdline=extra_cmdline,
                files=guest_files(base),
            )
            return run, show(run, lines)

        judge = Judge()
        first_vm = vm(base)
        setup = time.monotonic() - start
        print(f"set-up: {setup:.0f}s (initramfs {setup - stores:.0f}s, lower stores {stores:.0f}s)")
        print(f"\nkernel command line: {first_vm.cmdline}")
        print(
            "the lower store, built on the host by Nix: nb-leaf-1.0, nb-dep-1.0 and nb-keep-1.0"
            " (both refer to nb-leaf), and their registration (regInfo=)\n"
        )
        print("### boot 1: the guest builds demo-app (on nb-dep) and demo-tool (on nb-keep)")
        print(
            "(without x-nix-db the guest's Nix database lives on its root and forgets them"
            " at the next boot: microvm.nix's caveat)"
        )
        first, (build,) = boot(first_vm, BUILD)
        built = ns.store_paths(build) if build.rc == 0 else []
        judge(first, {f"built {', '.join(map(short, built))}": building(build) and len(built) == 2})
        app, tool = (built + ["(not built)"] * 2)[:2]

        print("### boot 2: a plain reboot")
        second, (valid, rebuild, verify) = boot(
            first_vm, f"nix-store --check-validity --print-invalid {app} {tool}", BUILD, VERIFY
        )
        judge(
            second,
            {
                "both packages still valid": valid.rc == 0 and not valid.output,
                "the rebuild built nothing": rebuild.rc == 0
                and not building(rebuild)
                and ns.store_paths(rebuild) == built,
                "verify clean": ns.judge_verify(verify).clean,
            },
        )

        new = rebuilt.paths["new"]
        gone = ", ".join(map(short, rebuilt.gone))
        print(f"### boot 3: the host rebuilt the lower store: {gone} gone, {short(new)} new")
        third_vm = vm(rebuilt)
        print(f"kernel command line: {third_vm.cmdline}")
        check = f"nix-store --check-validity --print-invalid {app} {tool} {new}"
        third, (valid, verify) = boot(third_vm, check, VERIFY)
        judge(
            third,
            {
                f"{gone} and {short(app)}, which needs it, invalidated": "invalidated"
                in third.stderr
                and ns.invalid_paths(valid) == {app},
                f"{short(tool)} still valid, {short(new)} registered": tool not in valid.output
                and new not in valid.output,
                "verify clean": ns.judge_verify(verify).clean,
            },
        )

        print("### boot 4: the other choice: reboot with microvm.reset-overlay")
        print(f"kernel command line: {third_vm.cmdline} microvm.reset-overlay")
        fourth, (upper, valid) = boot(
            third_vm, f"ls -A {UPPER}", check, extra_cmdline="microvm.reset-overlay"
        )
        judge(
            fourth,
            {
                "the upper layer is empty": upper.rc == 0 and not upper.output,
                "a fresh database: only the lower store is valid": valid.rc == 0
                and ns.invalid_paths(valid) == {app, tool},
            },
        )
        runs = (first, second, third, fourth)
        boots = ", ".join(f"{r.boot.duration:.0f}s" for r in runs)
        print(f"boots: {boots}; demo total {time.monotonic() - start:.0f}s")
        print("demo FAILED" if judge.failed else "demo finished")
        return 1 if judge.failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Before and after a change of the agent, side by side in one run (issue 9).

    python3 bench/compare.py                       # BEFORE b1e90cc, AFTER this tree
    python3 bench/compare.py --before e44272d --kernels 6.12 --rounds 4 --startup-reps 7

BEFORE is a commit, checked out with `git worktree add --detach` in a temporary
directory (removed at the end); AFTER is this repository's working tree. Both are
measured in the same run, alternating, so that the host's load falls on both:

1. Host start-up, as bench/startup.py measures it: Debian's /usr/bin/python3.11
   with PYTHONPATH=<tree>:<click> (PYTHON* variables of the caller dropped, cwd /)
   running `-m guest_agent mount-all --dry-run --cmdline FILE --config /dev/null`
   with the boot-path benchmark's command line, and `-c pass` (bare); each round
   runs the three, rotating which goes first. Medians, the AFTER/BEFORE ratio of the
   medians and the median of the per-round ratios; the dry-run plans (the
   `would-mount` lines) of both trees are compared.
2. Guest boot path, warm: per kernel ONE guest boot with bench/boot_path.py's
   devices (5 virtio-9p and 3 virtio-fs shares, the ro-store share, an ext4 volume
   by LABEL and the /nix/store overlay, from the kernel command line). Both trees'
   `guest_agent` packages are in the initramfs, byte-compiled by the guest's
   python3.11 exactly as build-initramfs compiles the installed one (unchecked-hash
   .pyc): BEFORE under /opt/ga-before, AFTER under /opt/ga-after, and both run the
   same way, through the installed console script with PYTHONPATH pointing at their
   copy (`PYTHONPATH=/opt/ga-X guest-agent mount-all`), so they differ in nothing
   but the package. The installed agent (AFTER, from the base initramfs' wheel, no
   PYTHONPATH) runs too, for information. The first run of the boot (the installed
   agent) loads the modules and is not timed for the ratio; BEFORE and AFTER then
   each run once untimed; then each round times the three, rotating the order, with
   everything unmounted (reverse order) and synced between runs. The mount table
   (/proc/self/mountinfo, the 9p/virtiofs/ext4/overlay lines) after every run is
   compared with the first one's.

Prints a table; the raw numbers go to --json (bench/compare.json by default:
`python3 bench/run.py --from-json bench/results.json` then renders its section of
docs/benchmarks.md, between the method and the findings of bench/compare.md, so
regenerating the file keeps it). --profile adds, after the timed rounds, each
side's `-X importtime`, GC time and cProfile in the guest (in --json only). No
assertions on times: this is a measurement, not a test (pytest does not collect
bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, Env, Timings, boot_checked, log, median, ms, tb
from report import compare_section

GUEST_PYTHON = Path("/usr/bin/python3.11")
SIDES = ("before", "after")


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def _python(tree: Path) -> tuple[str, dict[str, str]]:
    """The interpreter and environment that run TREE's agent (as bench/startup.py)."""
    import click

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    py = str(GUEST_PYTHON) if GUEST_PYTHON.exists() else sys.executable
    env["PYTHONPATH"] = f"{tree}:{Path(click.__file__).parent.parent}"
    return py, env


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    return time.perf_counter() - t0, p


_WOULD = re.compile(r"^would-mount .*$", re.M)


def host_startup(trees: dict[str, Path], workdir: Path, reps: int) -> dict[str, Any]:
    from boot_path import agent_cmdline

    cl = workdir / "cmdline"
    cl.write_text(agent_cmdline() + "\n")
    empty = workdir / "empty.json"
    empty.write_text("{}\n")
    cmds: dict[str, tuple[list[str], dict[str, str]]] = {}
    plans: dict[str, list[str]] = {}
    for side, tree in trees.items():
        py, env = _python(tree)
        for config in ("/dev/null", str(empty)):
            cmd = [py, "-m", "guest_agent", "mount-all", "--dry-run"]
            cmd += ["--cmdline", str(cl), "--config", config]
            _, p = _timed(cmd, env)  # also warms the page cache and writes __pycache__
            if p.returncode == 0:
                break
        else:
            raise RuntimeError(f"{side}: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
        cmds[side] = (cmd, env)
        _, w = _timed([py, "-c", "import guest_agent; print(guest_agent.__file__)"], env)
        if not w.stdout.startswith(str(tree) + "/"):
            raise RuntimeError(f"{side}: imports guest_agent from {w.stdout.strip()}, not {tree}")
        plans[side] = _WOULD.findall(p.stdout + p.stderr)
    py, env = _python(trees["after"])
    cmds["bare"] = ([py, "-c", "pass"], env)
    _timed(*cmds["bare"])
    order = ["bare", "before", "after"]
    runs: dict[str, list[float]] = {k: [] for k in order}
    log(f"host start-up: {reps} rounds of bare/before/after ({py})")
    for i in range(reps):
        for what in order[i % 3 :] + order[: i % 3]:
            s, p = _timed(*cmds[what])
            if p.returncode != 0:
                raise RuntimeError(f"{what} failed ({p.returncode}):\n{p.stderr}")
            runs[what].append(s)
    ratios = [a / b for a, b in zip(runs["after"], runs["before"], strict=True)]
    return {
        "python": py,
        "reps": reps,
        "commands": {k: " ".join(c) for k, (c, _) in cmds.items()},
        "runs": runs,
        "medians": {k: median(v) for k, v in runs.items()},
        "above_bare": {k: median(runs[k]) - median(runs["bare"]) for k in SIDES},
        "ratio": median(runs["after"]) / median(runs["before"]),
        "ratio_per_round": median(ratios),
        "ratio_above_bare": (median(runs["after"]) - median(runs["bare"]))
        / (median(runs["before"]) - median(runs["bare"])),
        "plans": plans,
        "same_plan": plans["before"] == plans["after"] and len(plans["after"]) == 11,
    }


def guest_package(tree: Path, where: str, stage: Path) -> dict[str, bytes]:
    """TREE's guest_agent package as guest files under WHERE, byte-compiled the way
    build-initramfs compiles the installed one (guest python3.11, unchecked-hash)."""
    root = stage / where.strip("/").replace("/", "_")
    dest = root / where.lstrip("/")
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(
        tree / "guest_agent", dest / "guest_agent", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [
            str(GUEST_PYTHON),
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(root),
            "-p",
            "/",
            str(dest),
        ],
        check=True,
    )
    return {
        "/" + str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


PROFILE_SCRIPT = r"""
# Diagnostics (--profile, after the timed rounds): where each side's time goes.
for what in before after; do
    for i in 1 2 3; do
        PYTHONPATH=/opt/ga-$what python3 -X importtime /usr/bin/guest-agent mount-all 2>/tmp/imp >/dev/null
        echo "@@importtime $what $i@@"; grep 'import time' /tmp/imp; echo "@@end@@"
        unmount_all
    done
    echo "@@gc $what@@"
    PYTHONPATH=/opt/ga-$what python3 -c '
import gc, sys, time
spent, start = [0.0, 0], [0.0]
def cb(phase, info):
    if phase == "start":
        start[0] = time.perf_counter()
    else:
        spent[0] += time.perf_counter() - start[0]
        spent[1] += 1
gc.callbacks.append(cb)
sys.argv = ["guest-agent", "mount-all"]
from guest_agent.main import run
try:
    run()
except SystemExit:
    pass
sys.stderr.write("@@gc: %d collections, %.1f ms\n" % (spent[1], spent[0] * 1000))
' 2>&1 >/dev/null | grep '^@@gc:'
    echo "@@end@@"
    unmount_all
    PYTHONPATH=/opt/ga-$what python3 -m cProfile -o /tmp/prof-$what /usr/bin/guest-agent mount-all >/dev/null 2>&1
    unmount_all
    echo "@@profile $what@@"
    python3 -c "
import pstats
s = pstats.Stats('/tmp/prof-$what')
s.sort_stats('cumulative').print_stats('guest_agent', 60)
s.sort_stats('tottime').print_stats(40)
" | sed -e 's#/usr/lib/python3[^ ]*/##g' -e 's#/opt/ga-[a-z]*/##g' | grep -v '^ *$\|Ordered by\|List reduced'
    echo "@@end@@"
done
"""


def guest_script(points: list[str], rounds: int, profile: bool = False) -> str:
    pts = " ".join(points)
    return rf"""
before() {{ PYTHONPATH=/opt/ga-before guest-agent mount-all >/tmp/before.log 2>&1; }}
after() {{ PYTHONPATH=/opt/ga-after guest-agent mount-all >/tmp/after.log 2>&1; }}
installed() {{ guest-agent mount-all >/tmp/installed.log 2>&1; }}
unmount_all() {{
    for m in {pts}; do umount "$m" || echo "umount $m failed"; done
    sync
}}
show() {{ echo "@@mounts $1@@"; grep -E ' (9p|virtiofs|ext4|overlay) ' /proc/self/mountinfo; echo "@@end@@"; }}
# Which copy each side imports (a check that PYTHONPATH picks the right tree).
echo "@@which@@"
for d in /opt/ga-before /opt/ga-after; do
    PYTHONPATH=$d python3 -c 'import guest_agent.main as m; print(m.__file__, m.__cached__)'
done
python3 -c 'import guest_agent.main as m; print(m.__file__, m.__cached__)'
echo "@@end@@"
timeit cold-installed installed || {{ cat /tmp/installed.log; exit 1; }}
echo "@@log installed@@"; cat /tmp/installed.log; echo "@@end@@"
show cold-installed
unmount_all
for what in before after; do
    timeit warm-$what $what || {{ cat /tmp/$what.log; exit 1; }}
    echo "@@log $what@@"; cat /tmp/$what.log; echo "@@end@@"
    show warm-$what
    unmount_all
done
i=0
while [ $i -lt {rounds} ]; do
    case $((i % 3)) in
        0) order="before after installed" ;;
        1) order="after installed before" ;;
        2) order="installed before after" ;;
    esac
    for what in $order; do
        timeit $what $what || cat /tmp/$what.log
        show $what-$i
        unmount_all
    done
    i=$((i + 1))
done
""" + (PROFILE_SCRIPT if profile else "")


def with_icount(vm: tb.VM, shift: int) -> None:
    """Run VM's qemu with `-icount shift=SHIFT`: the guest's clock then advances by 2**SHIFT ns
    per instruction executed (and follows the host's only while the guest is idle), so a
    CPU-bound interval measures the instructions it took, not the host's load."""
    command = vm.qemu_command

    def qemu_command(*args: Any, **kwargs: Any) -> list[str]:
        return [*command(*args, **kwargs), "-icount", f"shift={shift},sleep=on"]

    vm.qemu_command = qemu_command  # type: ignore[method-assign]


def guest_boot(
    env: Env,
    kernel: str,
    rounds: int,
    files: dict[str, bytes],
    profile: bool = False,
    icount: int | None = None,
) -> dict[str, Any]:
    from boot_path import _mounts_section, _section, agent_cmdline, agent_plan, make_vm

    work = env.workdir / f"compare-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    cmdline = agent_cmdline()
    plan = agent_plan(cmdline)
    vm = make_vm(env, kernel, "compare", work, cmdline, rounds)
    if icount is not None:
        with_icount(vm, icount)
    log(f"guest boot path on {kernel}: one boot, {rounds} rounds")
    points = [where for *_, where, _ in reversed(plan)]
    r = boot_checked(vm, guest_script(points, rounds, profile), files=files)
    t = Timings.parse(r.results)
    reference = _mounts_section(r.results, "cold-installed")
    labels = ["warm-before", "warm-after"] + [
        f"{w}-{i}" for i in range(rounds) for w in ("before", "after", "installed")
    ]
    differing = [x for x in labels if _mounts_section(r.results, x) != reference]
    runs = {w: t.seconds(w) for w in ("before", "after", "installed")}
    ratios = [a / b for a, b in zip(runs["after"], runs["before"], strict=True)]
    which = re.search(r"^@@which@@\n(.*?)^@@end@@", r.results, re.S | re.M)
    lines = which.group(1).splitlines() if which else []
    expected = ("/opt/ga-before/", "/opt/ga-after/", "/usr/lib/python3/dist-packages/")
    if len(lines) != 3 or not all(x.startswith(e) for x, e in zip(lines, expected, strict=True)):
        raise RuntimeError(f"the guest did not import each copy from its place: {lines}")
    return {
        "kernel": kernel,
        "release": env.testbed.release(kernel),
        "rounds": rounds,
        "runs": runs,
        "medians": {k: median(v) for k, v in runs.items()},
        "ratio": median(runs["after"]) / median(runs["before"]),
        "ratio_per_round": median(ratios),
        "ratios": ratios,
        "cold_installed": t.seconds("cold-installed"),
        "warm_untimed": {w: t.seconds(f"warm-{w}") for w in SIDES},
        "null": t.null(),
        "failures": t.failures(),
        "mounts": reference,
        "same_mounts": len(reference) == 11 and not differing,
        "differing_mounts": differing,
        "which": lines,
        "boot_seconds": r.duration,
        "icount": icount,
        "profile": {
            f"{kind} {w}" + (f" {i}" if kind == "importtime" else ""): _section(
                r.results, f"{kind} {w}" + (f" {i}" if kind == "importtime" else "")
            )
            for w in SIDES
            for kind in ("importtime", "profile", "gc")
            for i in (1, 2, 3)
        }
        if profile
        else {},
    }


def cold_boots(
    env: Env, kernel: str, boots: int, files: dict[str, bytes], icount: int | None = None
) -> dict[str, Any]:
    """BOOTS cold boots per side of the boot-path guest, BEFORE and AFTER alternating (the
    side that goes first swaps every pair): one timed `mount-all` per boot, the first thing
    to mount, modules not loaded yet; each must leave the 11 mounts."""
    from boot_path import agent_cmdline, make_vm

    work = env.workdir / f"compare-cold-{kernel}"
    work.mkdir(parents=True, exist_ok=True)
    vm = make_vm(env, kernel, "compare-cold", work, agent_cmdline(), 1)
    if icount is not None:
        with_icount(vm, icount)
    out: dict[str, list[float]] = {w: [] for w in SIDES}
    for i in range(2 * boots):
        side = SIDES[(i + i // 2) % 2]  # before, after, after, before, before, after, ...
        r = boot_checked(
            vm,
            f"timeit cold sh -c 'PYTHONPATH=/opt/ga-{side} guest-agent mount-all >/tmp/log 2>&1'"
            " || { cat /tmp/log; exit 1; }\n"
            "[ $(grep -cE ' (9p|virtiofs|ext4|overlay) ' /proc/self/mountinfo) -eq 11 ] || exit 1\n",
            files=files,
        )
        out[side] += [
            s - Timings.parse(r.results).null() for s in Timings.parse(r.results).seconds("cold")
        ]
        log(f"cold {kernel} {side}: {out[side][-1]:.2f} s")
    return {
        "boots": boots,
        "runs": out,
        "medians": {w: median(out[w]) for w in SIDES},
        "ratio": median(out["after"]) / median(out["before"]),
    }


def table(res: dict[str, Any]) -> str:
    b, a = res["before"], res["after"]
    out = [
        f"BEFORE {b} vs AFTER {a} — {res['started']}",
        "",
        "| | BEFORE | AFTER | AFTER / BEFORE (medians) | per-round ratio, median | runs |",
        "|---|---|---|---|---|---|",
    ]
    h = res.get("host")
    if h:
        m = h["medians"]
        out.append(
            f"| host start-up, whole process | {ms(m['before'])} | {ms(m['after'])} | "
            f"{h['ratio']:.2f}× | {h['ratio_per_round']:.2f}× | {h['reps']} |"
        )
        out.append(
            f"| host start-up above a bare interpreter ({ms(m['bare'])}) | "
            f"{ms(h['above_bare']['before'])} | {ms(h['above_bare']['after'])} | "
            f"{h['ratio_above_bare']:.2f}× | | |"
        )
    for k, g in res.get("guest", {}).items():
        m = g["medians"]
        out.append(
            f"| guest `mount-all`, warm, {k} | {ms(m['before'])} | {ms(m['after'])} | "
            f"{g['ratio']:.2f}× | {g['ratio_per_round']:.2f}× | {g['rounds']} |"
        )
    out.append("")
    if h:
        out.append(f"host: same dry-run plan (11 mounts): {h['same_plan']}")
    for k, g in res.get("guest", {}).items():
        out.append(
            f"guest {k} ({g['release']}): installed AFTER {ms(g['medians']['installed'])}, "
            f"cold first run {ms(g['cold_installed'][0]) if g['cold_installed'] else '–'}, "
            f"null {ms(g['null'])}, same mounts after every run: {g['same_mounts']}"
            + (f" (differ: {', '.join(g['differing_mounts'])})" if g["differing_mounts"] else "")
            + (f", failures: {g['failures']}" if g["failures"] else "")
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--before", default="b1e90cc", help="the BEFORE commit (default b1e90cc)")
    ap.add_argument("--kernels", default="6.12,6.1", help="guest kernels (default 6.12,6.1)")
    ap.add_argument("--rounds", type=int, default=12, help="guest rounds per boot (default 12)")
    ap.add_argument("--startup-reps", type=int, default=31, help="host rounds (default 31)")
    ap.add_argument("--no-host", action="store_true", help="skip the host start-up part")
    ap.add_argument(
        "--cold", type=int, default=0, metavar="N", help="also N cold boots per side per kernel"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: temp)")
    ap.add_argument(
        "--icount",
        type=int,
        default=None,
        metavar="SHIFT",
        help="run the guests with qemu -icount shift=SHIFT (guest time counts instructions)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, -X importtime and cProfile each side in the guest (in --json)",
    )
    ap.add_argument(
        "--json",
        type=Path,
        default=REPO_ROOT / "bench" / "compare.json",
        help="write the raw results here (default bench/compare.json, which bench/report.py "
        "renders into docs/benchmarks.md with bench/compare.md; give another path for a trial)",
    )
    ap.add_argument(
        "--append",
        action="store_true",
        help="add this run to those already in --json (the report renders each in turn)",
    )
    ap.add_argument(
        "--from-json", type=Path, default=None, help="only print the table and section of a run"
    )
    args = ap.parse_args(argv)
    if args.from_json:
        loaded = json.loads(args.from_json.read_text())
        for done in loaded if isinstance(loaded, list) else [loaded]:
            print(table(done))
            print(compare_section(done))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="guest-agent-compare-"))
    workdir.mkdir(parents=True, exist_ok=True)
    before_commit = git("rev-parse", "--short", args.before)
    dirty = bool(git("status", "--porcelain", "--", "guest_agent"))
    after_commit = git("log", "-1", "--format=%h", "--", "guest_agent") + (
        "+dirty" if dirty else ""
    )
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "before": before_commit,
        "after": after_commit,
        "head": git("rev-parse", "--short", "HEAD"),
        "load": os.getloadavg(),
        "cpus": os.cpu_count(),
        "guest": {},
    }

    earlier: list[Any] = []
    if args.append and args.json.exists():
        old = json.loads(args.json.read_text())
        earlier = old if isinstance(old, list) else [old]

    def save() -> None:
        done = [*earlier, res] if args.append else res
        args.json.write_text(json.dumps(done, indent=1, default=str) + "\n")

    before_tree = Path(tempfile.mkdtemp(prefix="ga-before-")) / "tree"
    git("worktree", "add", "--detach", str(before_tree), before_commit)
    try:
        trees = {"before": before_tree, "after": REPO_ROOT}
        if not args.no_host:
            res["host"] = host_startup(trees, workdir, args.startup_reps)
            save()
        if kernels:
            bed = tb.Testbed.from_env()
            bed.check()
            env = Env(bed, workdir)
            stage = workdir / "packages"
            files = {
                **guest_package(before_tree, "/opt/ga-before", stage),
                **guest_package(REPO_ROOT, "/opt/ga-after", stage),
            }
            for kernel in kernels:
                res["guest"][kernel] = guest_boot(
                    env, kernel, args.rounds, files, args.profile, args.icount
                )
                save()
                if args.cold:
                    res["guest"][kernel]["cold"] = cold_boots(
                        env, kernel, args.cold, files, args.icount
                    )
                    save()
    finally:
        git("worktree", "remove", "--force", str(before_tree))
        shutil.rmtree(before_tree.parent, ignore_errors=True)
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    save()
    print(table(res))
    print(compare_section(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

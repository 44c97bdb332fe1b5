#!/usr/bin/env python3
"""x-nix-db on the boot path (issue 10): the reconcile against the number of valid paths.

    python3 bench/nix_db.py                       # 6.12 then 6.1; 1 000, 10 000, 50 000
    python3 bench/nix_db.py --kernels 6.12 --sizes 1000 --rounds 2 --json /tmp/n.json
    python3 bench/nix_db.py --growth --rounds 5   # every size side by side, one boot per kernel
    python3 bench/nix_db.py --from-json bench/nix_db.json   # only print the Markdown

The Markdown goes between the marker comments of its section in docs/benchmarks.md
(by hand: bench/report.py does not know it); `--json` holds "results" or "growth",
bench/nix_db.json both (merged by hand).

One guest boot (the Nix variant of the test initramfs, TCG) per kernel and size.
The lower stores are nixstores.bulk(n) (the base) and nixstores.bulk(n,
changed=True) (a host rebuild: one path gone, one new; the bulk paths the same),
n+3 valid paths each, attached as erofs disks beside a scratch ext4 disk. The
guest mounts them once, then, per run, builds a root dir /r whose
/nix/.ro-store is a bind mount of one lower and /nix/.rw-store a bind mount of a
directory on the scratch disk, and times `guest-agent mount-all --root /r
--cmdline FILE` (FILE: the store overlay, with or without x-nix-db, and
regInfo=), then unmounts everything under /r. Caches are dropped before every
timed run (a boot reads the disks cold). Each round runs, in an order that
rotates from round to round:

  a  baseline: the overlay without x-nix-db (an RW dir kept across runs);
  b  x-nix-db, unchanged lower: RW state reconciled with this lower before
     ("Nix database unchanged since the last boot");
  c  x-nix-db, changed lower, database changed too: a fresh copy (cp -a,
     untimed) of the state reconciled with the base lower, mounted with the
     changed lower (a full reconcile: one path invalidated, one registered;
     the copy's new inodes make the database files differ from the record, as
     Nix writing it would, so `pragma integrity_check` runs as well);
  d  x-nix-db, first registration: an empty RW dir (the agent creates the
     database and registers every path); then, on the same RW dir:
  c0 x-nix-db, changed lower, database untouched since the agent's reconcile
     (a host rebuild while the guest did not use Nix: no integrity check);

and right after (a), with that overlay bound at /nix/store and a tmpfs at
/nix/var/nix (what NixOS's stage 2 does without x-nix-db):

  e  nix-store --load-db < the registration (through the overlay);
  f  nix-store --verify (no --check-contents) of that database.

The differences (b)-(a), (c)-(a), (c0)-(a), (d)-(a) are taken within a round,
then the median over rounds. After the rounds, one (b) and one (c) run under
cProfile, and the pieces of a reconcile are timed one by one without a
profiler (bench/where.py in the guest: WHERE below). With --pairs N, N more
(a)/(b) pairs alone close the boot. --growth instead boots once per kernel with
every size's lowers attached and alternates (a) and each size's (c) (growth_script). Nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "vm"))

import nixstores as ns
import testbed as tb
from common import PRELUDE, REPO_ROOT, Timings, log, median

VARIANTS = ("a", "b", "c", "d", "c0")
ORDERS = ("a b c d", "b c d a", "c d a b", "d a b c")
EXPECT = {
    "b": "Nix database unchanged since the last boot",
    "c": "reconciling the Nix database",
    "c0": "reconciling the Nix database",
    "d": "registered now",
}
#: Shell functions of both guest scripts: `setup LOWER RWDIR` binds a lower and an RW dir
#: into the root /r, `teardown` unmounts everything under it, `ga NAME` runs the agent
#: with /bench/NAME.cmdline.
GUEST_FUNCTIONS = r"""
setup() {
    mkdir -p /r/nix/.ro-store /r/nix/.rw-store
    mount --bind /m/$1 /r/nix/.ro-store && mount --bind /s/$2 /r/nix/.rw-store
}
teardown() {
    for m in $(awk '$2 ~ "^/r/" {print $2}' /proc/mounts | tac); do
        umount "$m" || echo "umount $m failed"
    done
    sync
}
ga() { guest-agent mount-all --root /r --cmdline /bench/$1.cmdline >/tmp/log 2>&1; }
"""
BEGIN = "<!-- nix_db.py: begin -->"
END = "<!-- nix_db.py: end -->"


def guest_script(reg: str, changed_reg: str, rounds: int, pairs: int) -> str:
    overlay = "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
    return rf"""
[ -d /sys/bus/pci/drivers/virtio-pci ] || modprobe virtio_pci
modprobe -a virtio_blk erofs ext4 overlay 2>/dev/null
n=0; while [ ! -b /dev/vdc ] && [ $n -lt 1000 ]; do usleep 10000; n=$((n + 1)); done
mkdir -p /m/base /m/changed /s /r /bench
mount -t erofs -o ro /dev/vda /m/base || exit 1
mount -t erofs -o ro /dev/vdb /m/changed || exit 1
mount -t ext4 /dev/vdc /s || exit 1
REG={reg}
echo "{overlay} regInfo=$REG" >/bench/plain.cmdline
echo "{overlay}:x-nix-db regInfo=$REG" >/bench/base.cmdline
echo "{overlay}:x-nix-db regInfo={changed_reg}" >/bench/changed.cmdline
mkdir -p /s/rw-plain
{GUEST_FUNCTIONS}loaddb() {{ nix-store --load-db <$REG >/tmp/e.log 2>&1; }}
verify() {{ nix-store --verify >/tmp/f.log 2>&1; }}
# agent LABEL CMDLINE(plain|base|changed): one timed mount-all, then its output
agent() {{
    dropcaches
    timeit $1 ga $2
    _rc=$?
    echo "@@log $1@@"; head -c 1500 /tmp/log; echo "@@end@@"
    return $_rc
}}
nixdb() {{
    mkdir -p /nix/store /nix/var/nix
    mount --bind /r/nix/store /nix/store && mount -t tmpfs tmpfs /nix/var/nix || return 1
    mkdir -p /nix/var/nix/gcroots /nix/var/nix/profiles
    dropcaches
    timeit e loaddb || cat /tmp/e.log
    dropcaches
    timeit f verify || cat /tmp/f.log
    echo "@@log f@@"; head -c 1500 /tmp/f.log; echo "@@end@@"
    umount /nix/var/nix; umount /nix/store
}}
run() {{
    case $1 in
        a) setup base rw-plain && agent a plain && nixdb ;;
        b) setup base rw-base && agent b base ;;
        c) cp -a /s/rw-base /s/rw-c && sync && setup changed rw-c && agent c changed ;;
        d) mkdir /s/rw-d && setup base rw-d && agent d base && teardown &&
            setup changed rw-d && agent c0 changed ;;
    esac
    _rc=$?
    teardown
    rm -rf /s/rw-c /s/rw-d
    return $_rc
}}
# Untimed set-up: load the modules, register the base lower into rw-base.
mkdir -p /s/rw-base
setup base rw-plain && agent warm plain; teardown
setup base rw-base && agent first base; teardown
setup base rw-base && agent warmb base; teardown
i=0
while [ $i -lt {rounds} ]; do
    case $((i % 4)) in
        0) order="{ORDERS[0]}" ;;
        1) order="{ORDERS[1]}" ;;
        2) order="{ORDERS[2]}" ;;
        3) order="{ORDERS[3]}" ;;
    esac
    for v in $order; do run $v || echo "@@failed $v"; done
    i=$((i + 1))
done
# (b) against (a) again, alone: PAIRS more pairs, alternating which goes first.
j=0
while [ $j -lt {pairs} ]; do
    if [ $((j % 2)) -eq 0 ]; then order="a b"; else order="b a"; fi
    for v in $order; do
        case $v in
            a) setup base rw-plain && agent pa plain ;;
            b) setup base rw-base && agent pb base ;;
        esac
        teardown
    done
    j=$((j + 1))
done
echo "@@sizes@@"; du -sk /s/rw-base/nix-state/db; ls -l /s/rw-base/nix-state/db; echo "@@end@@"
# Where the time goes: (b) and (c) under cProfile.
profile() {{
    dropcaches
    python3 -m cProfile -o /tmp/prof /usr/bin/guest-agent mount-all --root /r \
        --cmdline /bench/$2.cmdline >/dev/null 2>&1
    teardown
    echo "@@profile $1@@"
    python3 -c "
import pstats
s = pstats.Stats('/tmp/prof')
s.sort_stats('cumulative').print_stats('guest_agent', 30)
s.sort_stats('tottime').print_stats(20)
" | sed -e 's#/usr/lib/python3[^ ]*/##g' | grep -v '^ *$\|Ordered by\|List reduced'
    echo "@@end@@"
}}
setup base rw-base && profile b base
cp -a /s/rw-base /s/rw-c && sync && setup changed rw-c && profile c changed
rm -rf /s/rw-c
# Where the time goes, without a profiler: the pieces of a reconcile of the changed lower
# (its registration, the lower's names, the database copied from rw-base), caches dropped.
for i in 1 2 3; do
    cp -a /s/rw-base /s/rw-c && sync && dropcaches
    python3 /bench/where.py /m/changed/{changed_reg.removeprefix("/nix/store/")} \
        /m/changed /s/rw-c/nix-state/db/db.sqlite
    rm -rf /s/rw-c
done
"""


#: The pieces of a reconcile, timed one by one in the guest (see guest_script).
WHERE = r"""
import os, sys, time
t = time.perf_counter
T0 = t()
import sqlite3
from guest_agent.nixdb import registration as nixreg
T1 = t()
data = open(sys.argv[1], "rb").read()
T2 = t()
lines = data.decode("ascii").split("\n")
T3 = t()
entries = nixreg.parse_registration(data)
T4 = t()
names = set(os.listdir(sys.argv[2]))
T5 = t()
conn = sqlite3.connect("file:" + sys.argv[3] + "?mode=rw", uri=True, isolation_level=None)
conn.execute("pragma foreign_keys = 1")
T6 = t()
ok = conn.execute("pragma integrity_check").fetchall()
T7 = t()
rows = dict((p, i) for i, p in conn.execute("select id, path from ValidPaths"))
T8 = t()
new = [e for e in entries if "/nix/store/" + e.name not in rows and e.name in names]
T9 = t()
for label, a, b in (
    ("import", T0, T1), ("read", T1, T2), ("split", T2, T3), ("parse", T3, T4),
    ("listdir", T4, T5), ("connect", T5, T6), ("integrity", T6, T7),
    ("select", T7, T8), ("diff", T8, T9),
):
    print(f"@@W {label} {b - a:.6f}")
print(f"@@W-info entries={len(entries)} names={len(names)} rows={len(rows)} new={len(new)} {ok}")
"""
WHERE_LABELS = (
    "import",
    "read",
    "split",
    "parse",
    "listdir",
    "connect",
    "integrity",
    "select",
    "diff",
)
_W_LINE = re.compile(r"^@@W (\w+) ([\d.]+)$", re.M)


def growth_script(sizes: list[int], regs: dict[int, tuple[str, str]], rounds: int) -> str:
    """One boot, every size side by side: (a) and a (c) per size in rotating order, then the
    pieces of each size's reconcile (bench/where.py), alternating sizes. Lowers: /dev/vda,
    vdb (base, changed of the first size), vdc, vdd… ; the scratch disk last."""
    overlay = "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
    disks = "abcdefghijklmnop"
    mounts, prep, where = [], [], []
    for k, n in enumerate(sizes):
        base_reg, changed_reg = regs[n]
        mounts += [
            f"mkdir -p /m/base{n} /m/changed{n}",
            f"mount -t erofs -o ro /dev/vd{disks[2 * k]} /m/base{n} || exit 1",
            f"mount -t erofs -o ro /dev/vd{disks[2 * k + 1]} /m/changed{n} || exit 1",
            f'echo "{overlay}:x-nix-db regInfo={base_reg}" >/bench/base{n}.cmdline',
            f'echo "{overlay}:x-nix-db regInfo={changed_reg}" >/bench/changed{n}.cmdline',
        ]
        prep.append(f"mkdir -p /s/rw-base{n}; setup base{n} rw-base{n} && agent first{n} base{n}")
        prep.append("teardown")
        creg = changed_reg.removeprefix("/nix/store/")
        where.append(
            f"w{n}() {{ cp -a /s/rw-base{n} /s/rw-c && sync && dropcaches && "
            f"echo @@where {n}@@ && python3 /bench/where.py /m/changed{n}/{creg} /m/changed{n} "
            f"/s/rw-c/nix-state/db/db.sqlite; echo @@end@@; rm -rf /s/rw-c; }}"
        )
    labels = ["a", *(f"c{n}" for n in sizes)]
    orders = [" ".join(labels[i:] + labels[:i]) for i in range(len(labels))]
    cases = "\n".join(f'        {i}) order="{o}" ;;' for i, o in enumerate(orders))
    runs = "\n".join(
        f"        c{n}) cp -a /s/rw-base{n} /s/rw-c && sync && setup changed{n} rw-c && "
        f"agent c{n} changed{n} ;;"
        for n in sizes
    )
    first = sizes[0]
    nl = "\n"
    return rf"""
last=/dev/vd{disks[2 * len(sizes)]}
[ -d /sys/bus/pci/drivers/virtio-pci ] || modprobe virtio_pci
modprobe -a virtio_blk erofs ext4 overlay 2>/dev/null
n=0; while [ ! -b $last ] && [ $n -lt 1000 ]; do usleep 10000; n=$((n + 1)); done
mkdir -p /s /r /bench
{nl.join(mounts)}
mount -t ext4 $last /s || exit 1
echo "{overlay} regInfo={regs[first][0]}" >/bench/plain.cmdline
mkdir -p /s/rw-plain
{GUEST_FUNCTIONS}agent() {{
    dropcaches
    timeit $1 ga $2
    _rc=$?
    echo "@@log $1@@"; head -c 600 /tmp/log; echo "@@end@@"
    return $_rc
}}
{nl.join(where)}
setup base{first} rw-plain && agent warm plain; teardown
{nl.join(prep)}
run() {{
    case $1 in
        a) setup base{first} rw-plain && agent a plain ;;
{runs}
    esac
    _rc=$?
    teardown
    rm -rf /s/rw-c
    return $_rc
}}
i=0
while [ $i -lt {rounds} ]; do
    case $((i % {len(orders)})) in
{cases}
    esac
    for v in $order; do run $v || echo "@@failed $v"; done
    if [ $((i % 2)) -eq 0 ]; then ws="{" ".join(map(str, sizes))}"
    else ws="{" ".join(map(str, reversed(sizes)))}"; fi
    for n in $ws; do w$n; done
    i=$((i + 1))
done
"""


def run_growth(
    testbed: tb.Testbed, initramfs: Path, kernel: str, sizes: list[int], rounds: int, work: Path
) -> dict[str, Any]:
    lowers = {n: (ns.bulk(n, testbed), ns.bulk(n, testbed, changed=True)) for n in sizes}
    work.mkdir(parents=True, exist_ok=True)
    scratch = tb.ext4_image(work / "scratch.img", "4G", label="scratch")
    disks = [
        tb.Disk(low.erofs, serial=f"{v}{n}", readonly=True)
        for n in sizes
        for v, low in zip(("b", "c"), lowers[n], strict=True)
    ]
    vm = tb.VM(
        testbed=testbed,
        kernel=kernel,
        initramfs=initramfs,
        workdir=work / "vm",
        disks=[*disks, tb.Disk(scratch, serial="scratch")],
        memory_mb=1024,
        timeout=900 + rounds * sum(sizes) * 0.002,
        label="bench-nix-db-growth",
    )
    regs = {n: (b.registration, c.registration) for n, (b, c) in lowers.items()}
    log(f"x-nix-db growth on {kernel}, sizes {sizes} side by side: {rounds} rounds")
    start = time.monotonic()
    r = vm.boot(PRELUDE + growth_script(sizes, regs, rounds), files={"bench/where.py": WHERE})
    if r.exit_code != 0 or r.timed_out:
        raise RuntimeError(f"benchmark guest failed:\n{r}")
    scratch.unlink()
    t = Timings.parse(r.results)
    a = t.seconds("a")
    out: dict[str, Any] = {"kernel": kernel, "rounds": rounds, "a": a, "sizes": {}}
    logs = _sections(r.results, "log")
    for n in sizes:
        c = t.seconds(f"c{n}")
        if len(c) != rounds or len(a) != rounds:
            raise RuntimeError(f"c{n}: {len(c)} runs:\n{r.results[-4000:]}")
        diffs = [x - y for x, y in zip(c, a, strict=True)]
        where: dict[str, list[float]] = {}
        for body in _sections(r.results, "where").get(str(n), []):
            for m in _W_LINE.finditer(body):
                where.setdefault(m.group(1), []).append(float(m.group(2)))
        out["sizes"][str(n)] = {
            "valid_paths": len(lowers[n][0].valid),
            "c": c,
            "diffs": diffs,
            "diff_median": median(diffs),
            "checked": all(EXPECT["c"] in x for x in logs.get(f"c{n}", []))
            and len(logs.get(f"c{n}", [])) == rounds,
            "where": where,
            "where_medians": {k: median(v) for k, v in where.items()},
        }
    out["failures"] = t.failures()
    out["boot_seconds"] = r.duration
    log(
        f"  {time.monotonic() - start:.0f}s; (c)-(a) "
        + ", ".join(f"{n}: {out['sizes'][str(n)]['diff_median']:.3f}s" for n in sizes)
    )
    return out


def render_growth(growth: list[dict[str, Any]]) -> str:
    out = [
        "### Growth, sizes side by side",
        "",
        "A second boot per kernel attaches every size's lowers at once and, per round, runs "
        "(a) and (c) of each size in rotating order, then the pieces of each size's "
        "reconcile (median of the rounds, ms; `where.py`, bench/nix_db.py's profiler in the guest): the ratios between sizes "
        "come from the same minutes of the same guest, so the host's load weighs on every "
        "size alike.",
        "",
    ]
    for g in growth:
        sizes = sorted(g["sizes"], key=int)
        out.append(f"Linux {g['kernel']}, {g['rounds']} rounds:")
        out.append("")
        out.append(
            "| valid paths | (c)−(a) | × previous size (linear) | "
            + " | ".join(WHERE_LABELS)
            + " |"
        )
        out.append("|---:|---:|---:|" + "---:|" * len(WHERE_LABELS))
        prev = None
        for n in sizes:
            z = g["sizes"][n]
            ratio = (
                f"{z['diff_median'] / prev[1]['diff_median']:.1f}× "
                f"({z['valid_paths'] / prev[1]['valid_paths']:.0f}×)"
                if prev
                else "–"
            )
            cells = " | ".join(
                f"{z['where_medians'][k] * 1000:.0f}" if k in z["where_medians"] else "–"
                for k in WHERE_LABELS
            )
            out.append(
                f"| {z['valid_paths']:,} | {_s(z['diff_median'])} "
                f"({_spread(z['diffs'])} ms) | {ratio} | {cells} |"
            )
            prev = (n, z)
        out.append("")
    return "\n".join(out) + "\n"


def _sections(text: str, prefix: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in re.finditer(rf"^@@{prefix} (\w+)@@\n(.*?)^@@end@@", text, re.S | re.M):
        out.setdefault(m.group(1), []).append(m.group(2))
    return out


def run_one(
    testbed: tb.Testbed,
    initramfs: Path,
    kernel: str,
    size: int,
    rounds: int,
    pairs: int,
    work: Path,
) -> dict[str, Any]:
    base = ns.bulk(size, testbed)
    changed = ns.bulk(size, testbed, changed=True)
    work.mkdir(parents=True, exist_ok=True)
    scratch = tb.ext4_image(work / "scratch.img", "2G", label="scratch")
    vm = tb.VM(
        testbed=testbed,
        kernel=kernel,
        initramfs=initramfs,
        workdir=work / "vm",
        disks=[base.disk("base"), changed.disk("changed"), tb.Disk(scratch, serial="scratch")],
        memory_mb=1024,
        timeout=900 + rounds * size * 0.03,
        label="bench-nix-db",
    )
    log(f"x-nix-db on {kernel}, {size} paths ({len(base.valid)} valid): {rounds} rounds")
    start = time.monotonic()
    r = vm.boot(
        PRELUDE + ns.PREPARE + guest_script(base.registration, changed.registration, rounds, pairs),
        files={"bench/where.py": WHERE},
    )
    if r.exit_code != 0 or r.timed_out:
        raise RuntimeError(f"benchmark guest failed:\n{r}")
    scratch.unlink()
    t = Timings.parse(r.results)
    where: dict[str, list[float]] = {}
    for m in _W_LINE.finditer(r.results):
        where.setdefault(m.group(1), []).append(float(m.group(2)))
    logs = _sections(r.results, "log")
    checks = {
        v: sum(EXPECT[v] in x for x in logs.get(v, [])) == len(logs.get(v, [])) == rounds
        for v in EXPECT
    }
    runs = {v: t.seconds(v) for v in (*VARIANTS, "e", "f")}
    for v, xs in runs.items():
        if len(xs) != rounds:
            raise RuntimeError(f"{v}: {len(xs)} timed runs, not {rounds}:\n{r.results[-4000:]}")
    diffs = {
        v: [x - a for x, a in zip(runs[v], runs["a"], strict=True)] for v in ("b", "c", "c0", "d")
    }
    pair_diffs = [b - a for a, b in zip(t.seconds("pa"), t.seconds("pb"), strict=True)]
    checks["pb"] = len(pair_diffs) == pairs and all(EXPECT["b"] in x for x in logs.get("pb", []))
    verify_clean = all(
        all(line.strip() in ns.VERIFY_PROGRESS for line in x.splitlines() if line.strip())
        for x in logs.get("f", [])
    )
    log(
        f"  {time.monotonic() - start:.0f}s; medians "
        + ", ".join(f"{v} {median(xs):.3f}s" for v, xs in runs.items())
    )
    return {
        "kernel": kernel,
        "size": size,
        "valid_paths": len(base.valid),
        "rounds": rounds,
        "runs": runs,
        "medians": {v: median(xs) for v, xs in runs.items()},
        "diffs": diffs,
        "diff_medians": {v: median(xs) for v, xs in diffs.items()},
        "pairs": {"a": t.seconds("pa"), "b": t.seconds("pb")},
        "pair_diffs": pair_diffs,
        "pair_diff_median": median(pair_diffs),
        "checks": checks,
        "verify_clean": verify_clean,
        "failures": t.failures(),
        "null": t.null(),
        "cold": {k: t.seconds(k) for k in ("warm", "first", "warmb")},
        "logs": {k: v[:1] for k, v in logs.items()},
        "db_sizes": _sections(r.results.replace("@@sizes@@", "@@sizes x@@"), "sizes").get(
            "x", [""]
        )[0],
        "profiles": {k: v[0] for k, v in _sections(r.results, "profile").items()},
        "where": where,
        "where_medians": {k: median(v) for k, v in where.items()},
        "where_info": re.findall(r"^@@W-info (.*)$", r.results, re.M),
        "boot_seconds": r.duration,
    }


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


def _s(x: float) -> str:
    return f"{x:.2f} s"


def _spread(xs: list[float], scale: float = 1000.0) -> str:
    return f"{min(xs) * scale:.0f}–{max(xs) * scale:.0f}" if xs else "–"


def render(results: list[dict[str, Any]], growth: list[dict[str, Any]]) -> str:
    out = [BEGIN, "## x-nix-db: the reconcile on the boot path (issue 10)", ""]
    out.append(
        "Generated by `bench/nix_db.py` (raw results in `bench/nix_db.json`); method in its "
        "docstring. One TCG guest boot (Nix variant of the test initramfs, 1 CPU, 1 GiB) per "
        "kernel and size; the lowers are `nixstores.bulk(n)` and `bulk(n, changed=True)` "
        "(n+3 valid paths; the change: one path gone, one new) on erofs disks, RW on an ext4 "
        "disk; each run is `guest-agent mount-all --root /r --cmdline FILE`, timed in the "
        "guest, caches dropped before it. Per round, in rotating order: (a) the overlay "
        "without x-nix-db, (b) x-nix-db with the lower unchanged since the last reconcile, "
        "(c) x-nix-db with a changed lower (a copy of the state reconciled with the base "
        "lower: a full reconcile; the copy's new inodes also make the database count as "
        "written since, as after any Nix command in the guest, so `pragma integrity_check` "
        "runs too), (d) x-nix-db on an empty RW (first registration), then on that RW "
        "(c0) x-nix-db with the changed lower and the database untouched since (no "
        "integrity check: a host rebuild while the guest did not use Nix); after "
        "(a), with its overlay at /nix/store and a tmpfs at /nix/var/nix: (e) `nix-store "
        "--load-db < registration` (what NixOS's stage 2 does) and (f) `nix-store --verify`. "
        "Differences are taken within a round, then the median over the rounds (min–max in "
        "brackets). *Extra pairs*: after the rounds, (a) and (b) alone, N more pairs, "
        "alternating which goes first (the target for (b) is tens of ms, within the noise "
        "of one round)."
    )
    out.append("")
    for kernel in dict.fromkeys(r["kernel"] for r in results):
        rows = sorted((r for r in results if r["kernel"] == kernel), key=lambda r: r["size"])
        out.append(f"### Linux {kernel}")
        out.append("")
        out.append(
            "| valid paths | rounds | (a) baseline | (b)−(a) unchanged "
            "| (b)−(a), extra pairs | (c)−(a) changed lower "
            "| (c0)−(a) changed lower, db untouched "
            "| (d)−(a) first registration | (e) `--load-db` | (f) `--verify` |"
        )
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            m, d, dd = r["medians"], r["diff_medians"], r["diffs"]
            out.append(
                f"| {r['valid_paths']:,} | {r['rounds']} | {_ms(m['a'])} "
                f"| {_ms(d['b'])} ({_spread(dd['b'])}) "
                f"| {_ms(r['pair_diff_median'])} ({_spread(r['pair_diffs'])}; "
                f"{len(r['pair_diffs'])} pairs) "
                f"| {_s(d['c'])} ({_spread(dd['c'], 1.0 * 1000)} ms) "
                f"| {_s(d['c0'])} ({_spread(dd['c0'])} ms) "
                f"| {_s(d['d'])} | {_s(m['e'])} | {_s(m['f'])} |"
            )
        out.append("")
        by = {r["size"]: r for r in rows}
        notes = []
        for lo, hi in ((1000, 10_000), (10_000, 50_000)):
            if lo in by and hi in by:
                c_lo, c_hi = by[lo]["diff_medians"]["c"], by[hi]["diff_medians"]["c"]
                notes.append(
                    f"(c) {hi // 1000}k/{lo // 1000}k: {c_hi / c_lo:.1f}× "
                    f"(linear: {hi // lo}×; paths ×{by[hi]['valid_paths'] / by[lo]['valid_paths']:.1f})"
                )
                c0_lo, c0_hi = by[lo]["diff_medians"]["c0"], by[hi]["diff_medians"]["c0"]
                notes.append(f"(c0) {c0_hi / c0_lo:.1f}×")
                e_lo, e_hi = by[lo]["medians"]["e"], by[hi]["medians"]["e"]
                notes.append(f"(e) {e_hi / e_lo:.1f}×")
        if notes:
            out.append("Growth: " + "; ".join(notes) + ".")
            out.append("")
        pieces = [k for k in WHERE_LABELS if any(k in r.get("where_medians", {}) for r in rows)]
        if pieces:
            out.append(
                "Pieces of a reconcile of the changed lower, timed one by one in the guest "
                "without a profiler (caches dropped; median of 3, ms): "
                + "; ".join(
                    f"{r['valid_paths']:,}: "
                    + ", ".join(f"{k} {r['where_medians'][k] * 1000:.0f}" for k in pieces)
                    for r in rows
                    if r.get("where_medians")
                )
                + "."
            )
            out.append("")
        bad = [
            f"{r['size']}: {', '.join(v for v, ok in r['checks'].items() if not ok)}"
            for r in rows
            if not all(r["checks"].values()) or r["failures"] or not r["verify_clean"]
        ]
        out.append(
            "Checks: every (b) printed “unchanged”, every (c), (c0) “reconciling”, every (d) "
            "“registered now”, every run exited 0, every verify was clean"
            + (": yes." if not bad else f": NO ({'; '.join(bad)}).")
        )
        out.append("")
    if growth:
        out.append(render_growth(growth))
    out.append(END)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kernels", default="6.12,6.1")
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=20, help="extra (a)/(b) pairs")
    ap.add_argument("--json", type=Path, default=REPO_ROOT / "bench" / "nix_db.json")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None, help="only print the Markdown")
    ap.add_argument(
        "--growth", action="store_true", help="only the sizes-side-by-side boot per kernel"
    )
    args = ap.parse_args(argv)
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        print(render(raw["results"], raw.get("growth", [])), end="")
        return 0
    testbed = tb.Testbed.from_env()
    testbed.check()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ga-bench-nixdb."))
    wheels = tb.build_wheels(workdir / "wheels")
    results: list[dict[str, Any]] = []
    growth: list[dict[str, Any]] = []
    sizes = [int(x) for x in args.sizes.split(",") if x]
    for kernel in [k for k in args.kernels.split(",") if k]:
        initramfs = tb.base_initramfs(testbed, kernel, wheels, nix=True)
        if args.growth:
            growth.append(
                run_growth(
                    testbed, initramfs, kernel, sizes, args.rounds, workdir / f"growth-{kernel}"
                )
            )
            args.json.write_text(json.dumps({"growth": growth}, indent=1) + "\n")
            continue
        for size in sizes:
            results.append(
                run_one(
                    testbed,
                    initramfs,
                    kernel,
                    size,
                    args.rounds,
                    args.pairs,
                    workdir / f"{kernel}-{size}",
                )
            )
            args.json.write_text(
                json.dumps(
                    {
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "results": results,
                    },
                    indent=1,
                )
                + "\n"
            )
    print(render(results, growth), end="")
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

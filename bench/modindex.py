#!/usr/bin/env python3
"""Resolving a boot's modules with a distribution kernel's full module index (issue 11).

An initrd with every module (initramfs-tools' MODULES=most, Debian's default) carries
depmod's indexes for 4 000-odd modules: modules.alias is 1.4 MB of text, modules.dep
0.6 MB, beside their binary tries. This benchmark depmods each test bed kernel's full
module tree on the host, puts the indexes (no module files) into the guest, and times
in one boot, in fresh processes, alternating, what a cold `mount-all` asks of them: the
modules for the aliases a boot resolves (the virtio devices' modaliases, fs-9p,
fs-virtiofs, fs-ext4, fs-overlay) and each one's dependency entry:

* text:   guest_agent.kmod.index reading only the text files (the agent before 6f3cc8b)
* binary: guest_agent.kmod.index as it is: depmod's binary indexes (guest_agent.kmod.binindex)
* bare:   `python3 -c pass`, the interpreter alone

Both sides run the same script and import the same modules; the medians minus bare
are the cost of resolving. Under `--icount N` the guest clock counts instructions.

    python3 bench/modindex.py --kernels 6.12,6.1 --rounds 7 --icount 3 --json X
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Env, Timings, boot_checked, median, run_kernels, tb

ALIASES = [
    "virtio:d00000009v00001AF4",
    "virtio:d00000002v00001AF4",
    "virtio:d0000001Av00001AF4",
    "pci:v00001AF4d00001049sv00001AF4sd00001100bc00sc00i00",
    "fs-9p",
    "fs-virtiofs",
    "fs-ext4",
    "fs-overlay",
]
INDEXES = (
    "modules.dep",
    "modules.dep.bin",
    "modules.alias",
    "modules.alias.bin",
    "modules.builtin",
    "modules.builtin.bin",
    "modules.builtin.alias.bin",
    "modules.builtin.modinfo",
    "modules.softdep",
)
RESOLVE = f"""
import sys
from guest_agent.kmod.index import ModuleIndex, normalize

class TextOnly(ModuleIndex):
    def _binary(self, name):
        return None

index = (TextOnly if sys.argv[1] == "text" else ModuleIndex)("/bench/modules")
found = []
for alias in {ALIASES!r}:
    for mod in index.lookup(alias):
        entry = index.dep(normalize(mod))
        found.append((alias, mod, entry.path if entry else None))
print(found)
"""


def full_indexes(testbed: tb.Testbed, kernel: str, dest: Path) -> dict[str, bytes]:
    """depmod over KERNEL's full module tree; its index files, by guest path."""
    tree = tb.depmod_full_tree(testbed, kernel, dest)
    return {f"bench/modules/{n}": (tree / n).read_bytes() for n in INDEXES if (tree / n).exists()}


def guest_script(rounds: int) -> str:
    return rf"""
v_bare() {{ python3 -c pass; }}
v_text() {{ python3 /bench/resolve.py text >/tmp/text.out; }}
v_binary() {{ python3 /bench/resolve.py binary >/tmp/binary.out; }}
v_text && v_binary && v_bare || exit 1
cmp -s /tmp/text.out /tmp/binary.out && echo "@@same@@" || {{ echo "@@differ@@"; cat /tmp/text.out /tmp/binary.out; }}
i=0
while [ $i -lt {rounds} ]; do
    case $((i % 3)) in
        0) order="text binary bare" ;;
        1) order="binary bare text" ;;
        2) order="bare text binary" ;;
    esac
    for v in $order; do timeit $v v_$v; done
    i=$((i + 1))
done
cat /tmp/binary.out
"""


def run(env: Env, kernel: str, rounds: int, icount: int | None, scratch: Path) -> dict[str, Any]:
    from compare import with_icount

    files: dict[str, str | bytes] = dict(full_indexes(env.testbed, kernel, scratch / kernel))
    files["bench/resolve.py"] = RESOLVE
    sizes = {k.rsplit("/", 1)[1]: len(v) for k, v in files.items() if k.startswith("bench/modules")}
    vm = env.vm(kernel, "modindex", timeout=120 + 30 * rounds)
    if icount is not None:
        with_icount(vm, icount)
    r = boot_checked(vm, guest_script(rounds), files=files)
    t = Timings.parse(r.results)
    null = t.null()
    seconds = {v: [s - null for s in t.seconds(v)] for v in ("text", "binary", "bare")}
    return {
        "kernel": kernel,
        "release": env.testbed.release(kernel),
        "icount": icount,
        "rounds": rounds,
        "sizes": sizes,
        "same_answers": "@@same@@" in r.results,
        "seconds": seconds,
        "answers": r.results.strip().splitlines()[-1],
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| kernel | clock | modules.alias / .bin | text: resolve | binary: resolve | text / binary | same answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = {v: median(s) for v, s in r["seconds"].items()}
        text, binary = m["text"] - m["bare"], m["binary"] - m["bare"]
        clock = f"-icount {r['icount']}" if r["icount"] is not None else "wall"
        sizes = r["sizes"]
        lines.append(
            f"| {r['kernel']} | {clock} | {sizes.get('modules.alias', 0) / 1e6:.2f} MB / "
            f"{sizes.get('modules.alias.bin', 0) / 1e6:.2f} MB | {text * 1000:.0f} ms "
            f"| {binary * 1000:.0f} ms | {text / binary:.1f}× | {r['same_answers']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kernels", default="6.12,6.1")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--icount", type=int, default=None, help="qemu -icount shift (default: off)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    return run_kernels(
        args.kernels,
        "ga-bench-modindex-",
        lambda env, kernel: [run(env, kernel, args.rounds, args.icount, env.workdir / "trees")],
        args.json,
        table,
    )


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Start-up in the guest, and the ways an initrd can start the interpreter (issue 11, goals 3-4).

One guest boot per kernel (the test bed's initramfs: Debian's python3.11, the agent
installed from its wheel and byte-compiled at image build time). Each round runs every
variant once, rotating which goes first; each run is a fresh process doing a dry run of
the boot-path benchmark's command line (`mount-all --dry-run --cmdline FILE --config
/dev/null`: parse, plan, report; no device, no mount), timed from the guest's shell:

* bare:       python3 -c pass              (and -I, -I -S: what the flags cost or save)
* m:          python3 -m guest_agent ...    (runpy: how the integrations started it)
* script:     guest-agent ...               (the console script: `from guest_agent.main import run`)
* c-I:        python3 -I -c 'from guest_agent.main import run; run()' ...
* c-I-S:      python3 -I -S -c '<dist-packages on sys.path>; ... run()' ...  (no `site`)
* c-I-OO:     python3 -I -OO -c '... run()' ...  (no docstrings or asserts: smaller .pyc; the
              untimed first runs compile the .opt-2.pyc files, which no image carries)
* empty:      python3 -I -c 'import emptypkg.m0; ...' (30 modules of one line: what an import
              costs by itself; the first rounds compile them, the timed ones read the .pyc)

"Above bare" is each variant's median minus bare's (same flags). Under `--icount N` the
guest's clock counts instructions (rounds agree within ~1 % on a loaded host); without
it, wall time. The installed files are never written at boot (the .pyc are compiled
when the image is built: unchecked-hash). Prints a Markdown table; --json keeps the raw
numbers. Not a test: no assertion on times.

    python3 bench/startup_guest.py --kernels 6.12,6.1 --rounds 15 --icount 3 --json X
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from boot_path import agent_cmdline
from common import Env, Timings, boot_checked, median, run_kernels

DIST = "/usr/lib/python3/dist-packages"
EMPTY_MODULES = 30
EMPTY_IMPORTS = "; ".join(f"import emptypkg.m{i}" for i in range(EMPTY_MODULES))
ARGS = "mount-all --dry-run --cmdline /bench/cmdline --config /dev/null"
RUN = "from guest_agent.main import run; run()"
VARIANTS = {
    "bare": "python3 -c pass",
    "bare-I": "python3 -I -c pass",
    "bare-I-S": "python3 -I -S -c pass",
    "m": f"python3 -m guest_agent {ARGS}",
    "script": f"guest-agent {ARGS}",
    "c-I": f"python3 -I -c '{RUN}' {ARGS}",
    "c-I-S": f"python3 -I -S -c 'import sys; sys.path.append(\"{DIST}\"); {RUN}' {ARGS}",
    "c-I-OO": f"python3 -I -OO -c '{RUN}' {ARGS}",
    # the fixed cost of an import: EMPTY_MODULES modules holding one assignment each
    "empty": f"python3 -I -c 'import sys; sys.path.insert(0, \"/bench\"); {EMPTY_IMPORTS}'",
}
#: Each variant's bare interpreter (same flags).
BASE = {
    "m": "bare",
    "script": "bare",
    "c-I": "bare-I",
    "c-I-S": "bare-I-S",
    "c-I-OO": "bare-I",
    "empty": "bare-I",
}


def guest_script(rounds: int) -> str:
    names = list(VARIANTS)
    funcs = "\n".join(
        f"v_{n.replace('-', '_')}() {{ {cmd} >/tmp/out 2>&1; }}" for n, cmd in VARIANTS.items()
    )
    lines = [funcs, "for n in 1 2; do  # warm the page cache, check each variant works"]
    for n in names:
        lines.append(
            f"    v_{n.replace('-', '_')} || {{ echo 'variant {n} failed'; cat /tmp/out; exit 1; }}"
        )
    lines.append("done")
    lines.append("i=0")
    lines.append(f"while [ $i -lt {rounds} ]; do")
    lines.append(f"    case $((i % {len(names)})) in")
    for k in range(len(names)):
        order = names[k:] + names[:k]
        lines.append(f"        {k}) order='{' '.join(order)}' ;;")
    lines.append("    esac")
    lines.append("    for v in $order; do timeit $v v_$(echo $v | tr - _); done")
    lines.append("    i=$((i + 1))")
    lines.append("done")
    return "\n".join(lines) + "\n"


def run(env: Env, kernel: str, rounds: int, icount: int | None) -> dict[str, Any]:
    from compare import with_icount

    vm = env.vm(kernel, "startup-guest", timeout=120 + 30 * rounds)
    if icount is not None:
        with_icount(vm, icount)
    files = {"bench/cmdline": agent_cmdline() + "\n", "bench/emptypkg/__init__.py": ""}
    files.update({f"bench/emptypkg/m{i}.py": f"X = {i}\n" for i in range(EMPTY_MODULES)})
    r = boot_checked(vm, guest_script(rounds), files=files)
    t = Timings.parse(r.results)
    if t.failures():
        raise RuntimeError(f"failed runs: {t.failures()}\n{r}")
    null = t.null()
    seconds = {v: [s - null for s in t.seconds(v)] for v in VARIANTS}
    return {"kernel": kernel, "icount": icount, "rounds": rounds, "null": null, "seconds": seconds}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| kernel | clock | variant | median | above its bare interpreter |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        clock = f"-icount {r['icount']}" if r["icount"] is not None else "wall"
        med = {v: median(s) for v, s in r["seconds"].items()}
        for v, cmd in VARIANTS.items():
            above = f"{(med[v] - med[BASE[v]]) * 1000:.0f} ms" if v in BASE else "–"
            shown = "python3 -I -c 'import emptypkg.m0; … emptypkg.m29'" if v == "empty" else cmd
            shown = shown.replace("|", "\\|")
            lines.append(
                f"| {r['kernel']} | {clock} | {v}: `{shown}` | {med[v] * 1000:.0f} ms | {above} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kernels", default="6.12,6.1")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--icount", type=int, default=None, help="qemu -icount shift (default: off)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    return run_kernels(
        args.kernels,
        "ga-bench-startup-",
        lambda env, kernel: [run(env, kernel, args.rounds, args.icount)],
        args.json,
        table,
    )


if __name__ == "__main__":
    sys.exit(main())

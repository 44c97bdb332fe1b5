#!/usr/bin/env python3
"""Run guest-agent's benchmarks and write the Markdown report (docs/benchmarks.md).

    python3 bench/run.py            # all four, kernels 6.12 then 6.1
    python3 bench/run.py --quick    # fewer repetitions: a smoke run
    python3 bench/run.py --only startup,boot --kernels 6.12 --out /tmp/b.md

Needs the VM test bed (tools/setup-testbed) and root (virtiofsd, mkfs).
Raw results are written next to the report as JSON (--json).
Not part of the test suite: nothing here is collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, Env, log, tb

ALL = ("startup", "boot", "reset", "throughput")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument(
        "--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}"
    )
    ap.add_argument(
        "--kernels", default="6.12,6.1", help="guest kernels, in order (default 6.12,6.1)"
    )
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md")
    ap.add_argument(
        "--json", type=Path, default=None, help="raw results (default: bench/results.json)"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument(
        "--from-json", type=Path, default=None, help="only re-render the report from raw results"
    )
    args = ap.parse_args(argv)

    import report

    json_path = args.json or (REPO_ROOT / "bench" / "results.json")
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        args.out.write_text(report.render(results))
        log(f"wrote {args.out}")
        return 0

    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(ALL)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    q = args.quick
    reps = {
        "startup": 7 if q else 31,
        "boot": 2 if q else 11,
        "reset": 1 if q else 3,
        "throughput": 1 if q else 9,
    }

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="guest-agent-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bed = tb.Testbed.from_env()
    env = Env(bed, workdir)
    results: dict = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "quick": q,
        "repetitions": reps,
        "kernels": {},
        "host": host_info(),
    }
    if json_path.exists() and args.only != ",".join(ALL):
        # A partial run updates the previous results instead of dropping the others.
        try:
            old = json.loads(json_path.read_text())
            results["kernels"] = old.get("kernels", {})
            results["startup"] = old.get("startup")
        except (OSError, ValueError):
            pass

    def save() -> None:
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        args.out.write_text(report.render(results))

    if "startup" in only:
        import startup

        t0 = time.monotonic()
        results["startup"] = startup.run(workdir, reps["startup"])
        results["startup"]["measured"] = stamp(t0)
        save()
    vm_benches = [b for b in ("boot", "reset", "throughput") if b in only]
    if vm_benches:
        bed.check()
        for kernel in kernels:
            kres = results["kernels"].setdefault(kernel, {})
            kres["release"] = bed.release(kernel)
            for b in vm_benches:
                t0 = time.monotonic()
                if b == "boot":
                    import boot_path

                    kres["boot"] = boot_path.run(
                        env, kernel, reps["boot"], 1 if q else 5, None if q else 3
                    )
                elif b == "reset":
                    import reset_cost

                    kres["reset"] = reset_cost.run(env, kernel, reps["reset"])
                else:
                    import throughput

                    kres["throughput"] = throughput.run(env, kernel, reps["throughput"])
                kres[b]["measured"] = stamp(t0)
                log(f"{b} on {kernel}: {time.monotonic() - t0:.0f} s")
                save()
    save()
    log(f"wrote {args.out} and {json_path} (scratch: {workdir})")
    return 0


def stamp(t0: float) -> dict[str, str]:
    """When a benchmark ran, how long it took, the host's load and the agent's commit."""
    import os

    return {
        "at": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": f"{time.monotonic() - t0:.0f}",
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "commit": host_info()["commit"],
    }


def host_info() -> dict[str, str]:
    import os
    import platform
    import subprocess

    qemu = subprocess.run(
        [tb.QEMU, "--version"], capture_output=True, text=True
    ).stdout.splitlines()
    git = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "guest_agent"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "commit": git + (" (guest_agent/ modified)" if dirty else ""),
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "qemu": qemu[0] if qemu else "?",
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers of the benchmarks: the VM test bed, guest-side timing, statistics.

Guest-side timing: busybox's `date` has no `%N`, so a timestamp is taken with
`adjtimex` (busybox), which prints the kernel's wall clock to the microsecond
(`time.tv_sec`, `time.tv_usec`). Each timed command is wrapped as

    adjtimex >/tmp/t0; COMMAND; adjtimex >/tmp/t1

and the two raw outputs are parsed after the second stamp, so no parsing falls
inside the interval. What does fall inside it is one fork+exec of `adjtimex`;
every script also times `true` (the "null" interval) so that this fixed cost
is known and reported (it is the same on both sides of every ratio).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "tests" / "vm"))

import testbed as tb  # noqa: E402

#: Shell prelude of every benchmark guest script.
PRELUDE = r"""
tv() { awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf "%d.%06d", s, u}' "$1"; }
# timeit LABEL COMMAND...: one line "@@T LABEL RC T0 T1" on the results channel.
timeit() {
    _l=$1; shift
    adjtimex >/tmp/t0 2>&1
    "$@"
    _rc=$?
    adjtimex >/tmp/t1 2>&1
    echo "@@T $_l $_rc $(tv /tmp/t0) $(tv /tmp/t1)"
    return $_rc
}
dropcaches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
for _i in 1 2 3 4 5; do timeit null true; done
"""

_T_LINE = re.compile(r"^@@T (\S+) (\d+) (\d+\.\d+) (\d+\.\d+)$", re.M)


@dataclass
class Timings:
    """Timed intervals from one guest boot: label -> list of (rc, seconds)."""

    by_label: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Timings:
        t = cls()
        for m in _T_LINE.finditer(text):
            label, rc, t0, t1 = m.group(1), int(m.group(2)), float(m.group(3)), float(m.group(4))
            t.by_label.setdefault(label, []).append((rc, t1 - t0))
        return t

    def seconds(self, label: str) -> list[float]:
        return [s for _, s in self.by_label.get(label, [])]

    def failures(self) -> list[str]:
        return [label for label, runs in self.by_label.items() if any(rc for rc, _ in runs)]

    def null(self) -> float:
        s = self.seconds("null")
        return statistics.median(s) if s else 0.0


def median(values: Iterable[float]) -> float:
    v = list(values)
    return statistics.median(v) if v else float("nan")


def spread(values: Sequence[float]) -> str:
    """min–max, for the report."""
    if not values:
        return "–"
    return f"{min(values) * 1000:.0f}–{max(values) * 1000:.0f}"


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x == x else "–"


@dataclass
class Env:
    """The test bed and a base initramfs per kernel (built once per run)."""

    testbed: tb.Testbed
    workdir: Path
    _wheels: list[Path] | None = None
    _initramfs: dict[str, Path] = field(default_factory=dict)

    def wheels(self) -> list[Path]:
        if self._wheels is None:
            self._wheels = tb.build_wheels(self.workdir / "wheels")
        return self._wheels

    def initramfs(self, kernel: str) -> Path:
        if kernel not in self._initramfs:
            self._initramfs[kernel] = tb.base_initramfs(self.testbed, kernel, self.wheels())
        return self._initramfs[kernel]

    def vm(self, kernel: str, name: str, **kw: object) -> tb.VM:
        return tb.VM(
            testbed=self.testbed,
            kernel=kernel,
            initramfs=self.initramfs(kernel),
            workdir=self.workdir / f"{name}-{kernel}",
            label=f"bench-{name}",
            **kw,  # type: ignore[arg-type]
        )


def boot_checked(vm: tb.VM, script: str, **kw: object) -> tb.BootResult:
    """Boot once; raise with the guest's output when the script did not finish cleanly."""
    r = vm.boot(PRELUDE + script, **kw)  # type: ignore[arg-type]
    if r.exit_code != 0 or r.timed_out:
        raise RuntimeError(f"benchmark guest failed:\n{r}")
    return r


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def agent_dry_run(
    cmdline: str, *python_flags: str, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """`python3 [FLAGS] -m guest_agent mount-all --dry-run` on the host for CMDLINE (no config)."""
    with tempfile.NamedTemporaryFile("w", prefix="ga-bench-", suffix=".cmdline") as cl:
        cl.write(cmdline + "\n")
        cl.flush()
        return subprocess.run(
            [
                sys.executable,
                *python_flags,
                "-m",
                "guest_agent",
                "mount-all",
                "--dry-run",
                "--cmdline",
                cl.name,
                "--config",
                "/dev/null",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=check,
        )


_LAYER_OPTIONS = ("lowerdir=", "upperdir=", "workdir=")


def comparable(rows: Iterable[Sequence[str]]) -> list[tuple[str, ...]]:
    """Mount rows (mount point, fstype, "MOUNT-OPTIONS SUPER-OPTIONS") with an overlay's
    layer options reduced to their names: the agent hands the layers to the kernel as the
    directories it holds open (/proc/self/fd/N, which 6.12 shows and 6.1 resolves to a
    path), and N depends on what else the run has open; a script gives paths."""
    out = []
    for point, fstype, options in rows:
        if fstype == "overlay":
            mount_options, _, supers = options.partition(" ")
            supers = ",".join(
                o.split("=", 1)[0] + "=…" if o.startswith(_LAYER_OPTIONS) else o
                for o in supers.split(",")
            )
            options = f"{mount_options} {supers}"
        out.append((point, fstype, options))
    return out


def run_kernels(
    kernels: str,
    prefix: str,
    run_one: Callable[[Env, str], list[dict[str, Any]]],
    json_path: Path | None,
    table: Callable[[list[dict[str, Any]]], str],
) -> int:
    """A benchmark script's main loop: the checked test bed, a scratch directory removed
    afterwards (named PREFIX…), RUN_ONE(env, kernel) for each of KERNELS (comma-separated),
    the results written to JSON_PATH after each kernel (partial results survive an
    interrupted run), then TABLE of them printed."""
    import json
    import time

    bed = tb.Testbed.from_env()
    bed.check()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        env = Env(bed, Path(tmp))
        start = time.monotonic()
        for kernel in kernels.split(","):
            results += run_one(env, kernel)
            log(f"{kernel}: done")
            if json_path:
                json_path.write_text(json.dumps(results, indent=1) + "\n")
        log(f"done in {time.monotonic() - start:.0f} s")
    print(table(results))
    return 0

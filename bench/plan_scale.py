"""Planning time against the number of specs (issue 8: hostile command lines).

Plans N specs (N = 1 000, 10 000, 40 000 by default): virtiofs shares and tmpfs
volumes at flat paths (/srv/fN) and in nested groups (/data/gJ, /data/gJ/sK,
/data/gJ/sK/deep), a 9p ro-store share, the RW volume and the /nix/store
overlay. 40 000 such specs are about a 1.2 MB command line.

Prints one line per N: the median of REPEAT runs of `plan()` on the built
config, the cmdline parse + merge that comes before it (for scale), and, with
--old, `plan()` of another revision (default main) loaded from `git show`, for
N up to --old-max (the quadratic planner needs ~20 s for 10 000 specs).
Run on the host: `python3 bench/plan_scale.py [--old [REV]] [--sizes 1000,10000]`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from guest_agent.config.merge import merge, parse_cmdline  # noqa: E402
from guest_agent.plan import plan  # noqa: E402
from guest_agent.spec import Config  # noqa: E402


def cmdline(n: int) -> str:
    """N specs: a third flat, two thirds nested, and the store overlay."""
    tokens = [
        "microvm.share=ro-store:/nix/.ro-store:9p",
        "microvm.volume=LABEL=rw:/nix/.rw-store:ext4",
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store",
    ]
    i = 0
    while len(tokens) < n:
        group, sub = divmod(i, 15)
        if sub == 0:
            tokens.append(f"microvm.volume=tmpfs:/data/g{group}:tmpfs")
        tokens.append(f"microvm.share=t{i}:/srv/f{i}:virtiofs")
        tokens.append(f"microvm.volume=tmpfs:/data/g{group}/s{sub}:tmpfs")
        tokens.append(f"microvm.volume=tmpfs:/data/g{group}/s{sub}/deep:tmpfs")
        i += 1
    return " ".join(tokens[:n])


def config_of(text: str) -> Config:
    config, problems, _ = merge([parse_cmdline(text)])
    assert not problems and len(config.mounts) == text.count(" ") + 1, problems[:3]
    return config


def median_time(run: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def old_plan(rev: str) -> Callable[[Config], Any]:
    source = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "show", f"{rev}:guest_agent/plan.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    module = types.ModuleType("plan_old")
    module.__dict__["__name__"] = "plan_old"
    exec(compile(source, f"{rev}:guest_agent/plan.py", "exec"), module.__dict__)
    return module.plan  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,40000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--old", nargs="?", const="main", default=None, metavar="REV")
    parser.add_argument("--old-max", type=int, default=10_000)
    args = parser.parse_args()
    before = old_plan(args.old) if args.old else None
    print(f"{'specs':>7} {'cmdline':>9} {'parse+merge':>12} {'plan':>9}" + (
        f" {'plan@' + args.old:>12} {'ratio':>7}" if before else ""))  # fmt: skip
    for n in (int(s) for s in args.sizes.split(",")):
        text = cmdline(n)
        config = config_of(text)
        parse_s = median_time(lambda: config_of(text), args.repeat)
        plan_s = median_time(lambda: plan(config), args.repeat)
        line = f"{n:>7} {len(text) / 1e6:>7.2f}MB {parse_s:>11.3f}s {plan_s:>8.3f}s"
        if before is not None:
            if n <= args.old_max:
                assert before(config) == plan(config), "the plans differ"
                old_s = median_time(lambda: before(config), 1 if n > 2000 else args.repeat)
                line += f" {old_s:>11.3f}s {old_s / plan_s:>6.0f}x"
            else:
                line += f" {'(skipped)':>12}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

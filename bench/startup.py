"""Benchmark 2, start-up cost on the host: the agent's boot path against a bare interpreter.

Runs, alternating, R times each:

* bare:  PY -c pass
* agent: PY -m guest_agent mount-all --dry-run --cmdline FILE --config EMPTY
  (and the same under -X importtime)

where FILE holds the boot-path benchmark's command line (8 shares, ro-store,
store volume, overlay) and EMPTY is /dev/null (or, with an agent that refuses
an empty file, a JSON file holding `{}`). Also the console script as the
guest runs it (`from guest_agent.main import run`: no runpy). The wall
time of each process is measured from the outside (fork to exit); the medians
and their difference are reported, and from the `-X importtime` output of each
agent run the median self and cumulative time of every module, the heaviest
listed.

PY is Debian's /usr/bin/python3.11, the interpreter the guest runs, with
PYTHONPATH pointing at the repository and click (so no site-packages .pth
files of a development interpreter are counted); when it is missing, the
running interpreter is used.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import REPO_ROOT, log, median

_IMPORT = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def _python() -> tuple[str, dict[str, str]]:
    import click

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    debian = Path("/usr/bin/python3.11")
    if debian.exists():
        env["PYTHONPATH"] = f"{REPO_ROOT}:{Path(click.__file__).parent.parent}"
        return str(debian), env
    env["PYTHONPATH"] = str(REPO_ROOT)
    return sys.executable, env


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
    return time.perf_counter() - t0, p.stderr, p.returncode


def parse_importtime(text: str) -> dict[str, tuple[int, int, int]]:
    """module -> (self µs, cumulative µs, depth) from -X importtime output."""
    out = {}
    for line in text.splitlines():
        m = _IMPORT.match(line)
        if m:
            out[m.group(4)] = (int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2)
    return out


def console_script() -> str:
    """The guest's /usr/bin/guest-agent for the entry point in pyproject.toml."""
    import tomllib

    target = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"][
        "guest-agent"
    ]
    module, _, attr = target.partition(":")
    return f"import sys\nfrom {module} import {attr}\nif __name__ == '__main__':\n    sys.exit({attr}())\n"


def run(workdir: Path, reps: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from boot_path import agent_cmdline

    work = workdir / "startup"
    work.mkdir(parents=True, exist_ok=True)
    cl = work / "cmdline"
    cl.write_text(agent_cmdline() + "\n")
    empty = work / "empty.json"
    empty.write_text("{}\n")
    py, env = _python()
    bare_cmd = [py, "-c", "pass"]
    bare_it_cmd = [py, "-X", "importtime", "-c", "pass"]
    # `--config /dev/null` (no config file), as long as the agent accepts an empty file.
    config = "/dev/null"
    probe = [
        py,
        "-m",
        "guest_agent",
        "mount-all",
        "--dry-run",
        "--cmdline",
        str(cl),
        "--config",
        config,
    ]
    if _timed(probe, env)[2] != 0:
        config = str(empty)
    agent_args = [
        "-m",
        "guest_agent",
        "mount-all",
        "--dry-run",
        "--cmdline",
        str(cl),
        "--config",
        config,
    ]
    agent_cmd = [py, *agent_args]
    agent_it_cmd = [py, "-X", "importtime", *agent_args]
    # The console script as initrd-hooks/build-initramfs writes it (no runpy, unlike -m).
    script = work / "guest-agent"
    script.write_text(console_script())
    script_cmd = [py, str(script), *agent_args[2:]]
    log(f"start-up cost: {reps} runs each of {py}")
    # warm the host's page cache
    for cmd in (bare_cmd, agent_cmd):
        _, err, rc = _timed(cmd, env)
        if rc != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{err}")
    bare, agent, bare_it, agent_it, script_runs = [], [], [], [], []
    imports: list[dict[str, tuple[int, int, int]]] = []
    bare_imports: list[dict[str, tuple[int, int, int]]] = []
    for _ in range(reps):
        bare.append(_timed(bare_cmd, env)[0])
        agent.append(_timed(agent_cmd, env)[0])
        script_runs.append(_timed(script_cmd, env)[0])
        s, err, _ = _timed(bare_it_cmd, env)
        bare_it.append(s)
        bare_imports.append(parse_importtime(err))
        s, err, _ = _timed(agent_it_cmd, env)
        agent_it.append(s)
        imports.append(parse_importtime(err))
    bare_mods = set().union(*bare_imports)
    mods: dict[str, dict[str, float]] = {}
    for name in set().union(*imports):
        rows = [r[name] for r in imports if name in r]
        mods[name] = {
            "self_ms": median(r[0] for r in rows) / 1000,
            "cum_ms": median(r[1] for r in rows) / 1000,
            "depth": rows[0][2],
            "in_bare": name in bare_mods,
        }
    # Import time the agent adds: the sum of self times of modules a bare interpreter
    # does not import.
    added_import = [
        sum(r[0] for n, r in run_.items() if n not in bare_mods) / 1000 for run_ in imports
    ]
    heaviest_top = sorted(
        ((n, m) for n, m in mods.items() if not m["in_bare"]), key=lambda x: -x[1]["cum_ms"]
    )
    heaviest_self = sorted(
        ((n, m) for n, m in mods.items() if not m["in_bare"]), key=lambda x: -x[1]["self_ms"]
    )
    return {
        "python": py,
        "reps": reps,
        "bare": bare,
        "agent": agent,
        "bare_importtime": bare_it,
        "agent_importtime": agent_it,
        "bare_median": median(bare),
        "agent_median": median(agent),
        "above_bare": median(agent) - median(bare),
        "above_bare_pairs": median(a - b for a, b in zip(agent, bare, strict=True)),
        "script": script_runs,
        "script_median": median(script_runs),
        "script_above_bare": median(script_runs) - median(bare),
        "entry_point": console_script().splitlines()[1],
        "config": config,
        "added_import_ms": median(added_import),
        "modules_added": sum(1 for m in mods.values() if not m["in_bare"]),
        "heaviest_cum": [(n, m) for n, m in heaviest_top[:25]],
        "heaviest_self": [(n, m) for n, m in heaviest_self[:25]],
        "cmdline": agent_cmdline(),
    }

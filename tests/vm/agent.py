"""Running guest-agent in a booted guest and reading back what the kernel shows.

`run_agent` boots once: it runs `guest-agent ARGS` (by default `mount-all`),
then the test's own shell lines, and returns the agent's exit status and
stderr, the guest's mount table after it ran, and the extra output, parsed
from marked sections of the results channel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import testbed as tb

_SECTION = re.compile(r"^@@(\w+)@@$", re.M)


@dataclass(frozen=True)
class GuestMount:
    mount_point: str
    fstype: str
    source: str
    mount_options: tuple[str, ...]
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.mount_options


@dataclass
class AgentRun:
    boot: tb.BootResult
    rc: int | None
    stderr: str
    mounts: dict[str, GuestMount] = field(default_factory=dict)
    mounts_before: dict[str, GuestMount] = field(default_factory=dict)
    stdout: str = ""
    out: str = ""  # the test's own lines, run after the agent
    seconds: float | None = None  # the agent's wall time in the guest

    def __str__(self) -> str:
        return str(self.boot)

    def new_mounts(self) -> dict[str, GuestMount]:
        return {k: v for k, v in self.mounts.items() if k not in self.mounts_before}


def parse_guest_mountinfo(text: str) -> dict[str, GuestMount]:
    mounts: dict[str, GuestMount] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        mounts[point] = GuestMount(
            point, tail[0], tail[1], tuple(fields[5].split(",")), tuple(tail[2].split(","))
        )
    return mounts


def agent_script(args: str = "mount-all", before: str = "", after: str = "") -> str:
    return f"""
{before}
echo @@before@@; cat /proc/self/mountinfo
echo @@stderr@@
t0=$(cut -d' ' -f1 /proc/uptime)
guest-agent {args} 2>/tmp/agent.err >/tmp/agent.out
rc=$?
t1=$(cut -d' ' -f1 /proc/uptime)
cat /tmp/agent.err
echo @@rc@@; echo $rc
echo @@seconds@@; echo "$t0 $t1"
echo @@stdout@@; cat /tmp/agent.out
echo @@mountinfo@@; cat /proc/self/mountinfo
echo @@out@@
{after}
"""


def sections(text: str) -> dict[str, str]:
    parts = _SECTION.split(text)
    found = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        found[name] = body.strip("\n")
    return found


def run_agent(
    vm: tb.VM,
    args: str = "mount-all",
    *,
    before: str = "",
    after: str = "",
    extra_cmdline: str = "",
    files: dict[str, str | bytes] | None = None,
    kill_at: str | None = None,
    timeout: float | None = None,
) -> AgentRun:
    boot = vm.boot(
        agent_script(args, before, after),
        extra_cmdline=extra_cmdline,
        files=files,
        kill_at=kill_at,
        timeout=timeout,
    )
    found = sections(boot.results)
    rc_text = found.get("rc", "").strip()
    seconds = None
    if "seconds" in found:
        t0, t1 = (float(x) for x in found["seconds"].split())
        seconds = t1 - t0
    return AgentRun(
        boot=boot,
        rc=int(rc_text) if rc_text.isdigit() else None,
        stderr=found.get("stderr", ""),
        mounts=parse_guest_mountinfo(found.get("mountinfo", "")),
        mounts_before=parse_guest_mountinfo(found.get("before", "")),
        stdout=found.get("stdout", ""),
        out=found.get("out", ""),
        seconds=seconds,
    )


"""The kernel log complete, the journal without doubles (issue 21, part 6).

/dev/kmsg lets 10 records per 5 s through one open file (kernel/printk/printk.c:
devkmsg_open makes the rate-limit state, devkmsg_write drops the rest and still
returns the length; the same on 6.1 and 6.12) unless ``printk.devkmsg=on``. Two boots
per kernel, default ``printk.devkmsg``:

* busybox ``/init``: ``mount-all`` with 30 tmpfs volumes, 25 malformed specs and a
  mount point longer than one kernel record: every line of its stderr is in ``dmesg``,
  in order, and the kernel suppressed none. Then, in the same boot,
  ``printk_devkmsg=off`` (the kernel refuses the open): the agent's line is on stderr
  and the run is otherwise unchanged.
* Debian 13's systemd 257 as PID 1 in a NixOS-shaped systemd initrd (nixos_initrd.py,
  case ``share-systemd``): ``guest-agent.service`` logs stderr to the journal
  (``journal+console``) and journald reads /dev/kmsg: each agent line is in the journal
  exactly once, the same lines as in the kernel log.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nixos_initrd as ni
import pytest
import testbed as tb
from agent import run_agent, sections

pytestmark = pytest.mark.vm

VOLUMES = 30
BAD_SPECS = 25
#: A mount point of 5 × 200 characters: its "mounted" line is over the 976 bytes of one
#: record, cut in two.
LONG = "/m/" + "/".join(c * 200 for c in "abcde")
#: The kernel's own line when it dropped records of an open file (ratelimit_state_exit).
SUPPRESSED = "output lines suppressed due to ratelimiting"

_DMESG_LINE = re.compile(r"^(?:<\d+>)?(?:\[\s*[\d.]+\] )?guest-agent: (.*)$")


def agent_lines(dmesg: str) -> list[str]:
    """The agent's lines in the kernel log (busybox dmesg's text), continuation records
    (`guest-agent: ... `) joined to the line they continue."""
    lines: list[str] = []
    for raw in dmesg.splitlines():
        m = _DMESG_LINE.match(raw)
        if not m:
            continue
        text = m.group(1)
        if text.startswith("... ") and lines:
            lines[-1] += text[4:]
        else:
            lines.append(text)
    return lines


def busy_cmdline() -> str:
    volumes = [f"microvm.volume=tmpfs:/m/v{i:02d}:tmpfs" for i in range(VOLUMES)]
    bad = [f"microvm.volume=LABEL=bad{i:02d}" for i in range(BAD_SPECS)]
    return " ".join([*volumes, *bad, f"microvm.volume=tmpfs:{LONG}:tmpfs"]) + "\n"


AFTER = """
echo @@dmesg@@; dmesg
echo @@off@@
echo off > /proc/sys/kernel/printk_devkmsg
echo microvm.volume=LABEL=devkmsg-off > /tmp/off.cmdline
guest-agent mount-all --cmdline /tmp/off.cmdline 2>/tmp/off.err
echo "rc=$?"
cat /tmp/off.err
echo @@dmesg_off@@; dmesg | grep -c devkmsg-off
"""


def test_every_line_of_a_busy_boot_is_in_dmesg_in_order(make_vm: Callable[..., tb.VM]) -> None:
    vm = make_vm()
    run = run_agent(
        vm,
        "mount-all --cmdline /busy.cmdline",
        files={"busy.cmdline": busy_cmdline()},
        after=AFTER,
    )
    assert run.rc == 1, run  # the malformed specs
    stderr = run.stderr.splitlines()
    assert len(stderr) >= VOLUMES + BAD_SPECS + 1, run
    assert sum(line.startswith("mounted tmpfs") for line in stderr) == VOLUMES + 1, run
    assert sum(line.startswith("error: ") for line in stderr) == BAD_SPECS, run
    assert any(LONG in line and len(line.encode()) > 1024 for line in stderr), run
    parts = sections(run.boot.results)
    dmesg = parts["dmesg"]
    assert agent_lines(dmesg) == stderr, (
        f"the kernel log has {len(agent_lines(dmesg))} of the agent's {len(stderr)} lines\n{run}"
    )
    assert SUPPRESSED not in dmesg, dmesg
    # printk.devkmsg=off: the kernel refuses the open; the line is on stderr only
    off = parts["off"].splitlines()
    assert off[0] == "rc=1", parts["off"]
    assert len(off) == 2 and off[1].startswith("error: microvm.volume=LABEL=devkmsg-off"), off
    assert parts["dmesg_off"].strip() == "0", parts["dmesg_off"]
    print(f"linux {vm.kernel}: {len(stderr)} lines in {run.seconds:.2f} s of agent time")


# --------------------------------------------------------------------------
# The journal: a systemd initrd whose journald reads /dev/kmsg
# --------------------------------------------------------------------------

CASE = "share-systemd"
#: Malformed specs on the kernel command line (the agent exits 1 and the boot goes on:
#: guest_agent.onfail=continue): with the mounts, more lines than one open file's burst.
JOURNAL_BAD_SPECS = 12

#: Runs in the initrd's report unit: the journal (after `journalctl --sync`, which waits
#: for journald to have read the kernel log written before it) and the kernel log's
#: records, from /dev/kmsg.
JOURNAL_PY = r"""
import json, os, subprocess
subprocess.run(["journalctl", "--sync"], check=False)
fields = "MESSAGE,SYSLOG_IDENTIFIER,_SYSTEMD_UNIT,_TRANSPORT"
out = subprocess.run(["journalctl", "-b", "-o", "json", "--output-fields=" + fields, "--no-pager"],
                     capture_output=True, text=True).stdout
journal = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
kmsg = []
fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
while True:
    try:
        record = os.read(fd, 8192)
    except BlockingIOError:
        break
    except BrokenPipeError:  # overwritten under us: read on
        continue
    text = record.decode(errors="replace").split(";", 1)[1].split("\n", 1)[0]
    kmsg.append(text.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace"))
print("@@journal " + json.dumps({"journal": journal, "kmsg": kmsg}))
"""


@pytest.fixture(scope="module")
def evaluated() -> dict[str, Any]:
    try:
        return ni.evaluate(CASE)
    except tb.TestbedError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def systemd_cpio(
    evaluated: dict[str, Any], testbed: tb.Testbed, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("systemd-initrd") / "systemd.cpio"
    try:
        return ni.build(evaluated, testbed, out, agent_delay=0)
    except tb.TestbedError as e:  # no Debian 13 systemd in the test bed: a failure, with the hint
        pytest.fail(str(e), pytrace=False)


def systemd_guest(
    make_vm: Callable[..., tb.VM],
    initramfs: Path,
    systemd_cpio: Path,
    evaluated: dict[str, Any],
    tmp_path: Path,
) -> tuple[tb.VM, str]:
    """The VM with the devices the evaluated config names (as test_nixos_systemd_initrd's
    guest), and nixpkgs' kernel parameters with init= of the closure in the lower store."""
    config = json.loads(evaluated["mountsJson"])
    store = tmp_path / "store"
    init = ni.make_store(store)
    home = tmp_path / "home"
    home.mkdir()
    shares = []
    for share in config["shares"]:
        host = store if share["tag"] == "ro-store" else home
        shares.append(tb.Share(share["tag"], host, proto=share["proto"], readonly=host == store))
    disks = []
    for i, volume in enumerate(config["volumes"]):
        image = tb.ext4_image(tmp_path / f"vol{i}.img", "64M", label=volume.get("label"))
        disks.append(tb.Disk(image, serial=f"vol{i}"))
    vm = make_vm(shares=shares, disks=disks, memory_mb=1024, timeout=240.0)
    vm.initramfs = ni.combine(initramfs, systemd_cpio, tmp_path / "initrd.cpio")
    return vm, " ".join([*evaluated["nixpkgs"]["kernelParams"], f"init={init}"])


def test_each_agent_line_is_once_in_the_journal(
    make_vm: Callable[..., tb.VM],
    initramfs: Path,
    systemd_cpio: Path,
    evaluated: dict[str, Any],
    tmp_path: Path,
) -> None:
    vm, params = systemd_guest(make_vm, initramfs, systemd_cpio, evaluated, tmp_path)
    bad = " ".join(f"microvm.volume=LABEL=journal{i:02d}" for i in range(JOURNAL_BAD_SPECS))
    r = vm.boot(
        "#!/bin/sh\npython3 - <<'PY'\n" + JOURNAL_PY + "PY\n",
        extra_cmdline=f"{params} guest_agent.onfail=continue {bad}",
    )
    assert not r.timed_out, r
    found = [ln for ln in r.results.splitlines() if ln.startswith("@@journal ")]
    assert found, f"no report from the initrd:\n{r}"
    facts = json.loads(found[0][len("@@journal ") :])
    kernel_log = [t[len("guest-agent: ") :] for t in facts["kmsg"] if t.startswith("guest-agent: ")]
    # the agent ran and said all it had to: the mounts and one error per malformed spec
    assert any(t.startswith("mounted overlay at /nix/store") for t in kernel_log), kernel_log
    errors = [t for t in kernel_log if t.startswith("error: microvm.volume=LABEL=journal")]
    assert len(errors) == JOURNAL_BAD_SPECS, kernel_log
    assert len(kernel_log) > 10, kernel_log  # over one open file's burst
    # the journal: the agent's entries (its unit's stream, or the kernel log's records
    # journald parsed as guest-agent's), each line once and the same as the kernel log's
    ours = [
        e
        for e in facts["journal"]
        if e.get("_SYSTEMD_UNIT") == "guest-agent.service"
        or e.get("SYSLOG_IDENTIFIER") == "guest-agent"
    ]
    messages = [e["MESSAGE"] for e in ours if isinstance(e.get("MESSAGE"), str)]
    doubles = {m: n for m, n in Counter(messages).items() if n > 1}
    assert not doubles, f"lines twice in the journal: {doubles}\n{ours}"
    assert [m for m in messages if m in kernel_log] == kernel_log, (messages, kernel_log)

"""The agent as a whole in a booted guest: order, idempotence, hostile input, coldplug, config."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import testbed as tb
from agent import run_agent, sections

pytestmark = pytest.mark.vm

MakeVM = Callable[..., tb.VM]


def _share(tmp_path: Path, tag: str, proto: str = "9p", **files: str) -> tb.Share:
    path = tmp_path / tag
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return tb.Share(tag, path, proto)  # type: ignore[arg-type]


def test_nested_mount_points_given_in_reverse_order(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = make_vm(
        shares=[
            _share(tmp_path, "inner", f="in\n"),
            _share(tmp_path, "outer", "virtiofs", f="out\n"),
        ],
        cmdline="microvm.share=inner:/srv/outer/inner:9p microvm.share=outer:/srv/outer",
    )
    run = run_agent(vm, after="cat /srv/outer/f /srv/outer/inner/f")
    assert run.rc == 0, run
    assert run.out.split() == ["out", "in"], run
    # Parent first: the inner mount sits on the outer one (its parent mount in mountinfo).
    lines = [
        x for x in run.boot.results.split("@@mountinfo@@")[1].splitlines() if "/srv/outer" in x
    ]
    outer = next(x.split() for x in lines if x.split()[4] == "/srv/outer")
    inner = next(x.split() for x in lines if x.split()[4] == "/srv/outer/inner")
    assert inner[1] == outer[0], lines


def test_second_run_changes_nothing(make_vm: MakeVM, tmp_path: Path) -> None:
    rw = tb.ext4_image(tmp_path / "rw.img", label="rw-store")
    vm = make_vm(
        shares=[_share(tmp_path, "ro-store", x="1\n"), _share(tmp_path, "data", "virtiofs")],
        disks=[tb.Disk(rw, serial="rw")],
        cmdline="microvm.share=ro-store:/nix/.ro-store microvm.share=data:/data "
        "microvm.volume=LABEL=rw-store:/nix/.rw-store "
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store",
    )
    run = run_agent(
        vm,
        after="cat /proc/self/mountinfo > /tmp/m1; guest-agent mount-all 2>/tmp/e2; echo rc2=$?;"
        " cat /proc/self/mountinfo > /tmp/m2; cmp /tmp/m1 /tmp/m2 && echo same; cat /tmp/e2",
    )
    assert run.rc == 0, run
    assert "rc2=0" in run.out and "same" in run.out, run
    assert run.out.count("already mounted") == 4, run.out


def test_two_runs_at_once_never_mount_twice(make_vm: MakeVM, tmp_path: Path) -> None:
    rw = tb.ext4_image(tmp_path / "rw.img", label="rw")
    vm = make_vm(
        shares=[_share(tmp_path, "s9", x="1\n"), _share(tmp_path, "sfs", "virtiofs")],
        disks=[tb.Disk(rw)],
        cmdline="microvm.share=s9:/a microvm.share=sfs:/b microvm.volume=LABEL=rw:/c",
    )
    boot = vm.boot(
        "guest-agent mount-all 2>/tmp/one & guest-agent mount-all 2>/tmp/two; rc2=$?; wait $!; rc1=$?\n"
        "echo rc=$rc1,$rc2; cat /tmp/one /tmp/two; cat /proc/self/mountinfo\n"
    )
    assert "rc=0,0" in boot.results, boot
    mounts = [x.split() for x in boot.results.splitlines() if " - " in x]
    for point in ("/a", "/b", "/c"):
        assert sum(1 for x in mounts if x[4] == point) == 1, boot.results
    # One run mounted each, the other found it mounted.
    assert boot.results.count("already mounted") == 3, boot.results


def test_malformed_and_hostile_specs_never_mount_outside_the_root(
    make_vm: MakeVM, tmp_path: Path
) -> None:
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    os.symlink("/", hostile / "to-root")
    os.symlink("../../../../..", hostile / "up")
    os.symlink("/etc", hostile / "etc")
    vm = make_vm(
        shares=[tb.Share("hostile", hostile, "9p"), _share(tmp_path, "good", f="ok\n")],
        cmdline=(
            "microvm.share=onlytag microvm.share=x:/../../etc microvm.share=y:relative "
            "microvm.volume=nonsense:/v microvm.share=z:/a:carrier-pigeon "
            "microvm.store-overlay=/nix/.ro-store "
            "microvm.share=hostile:/mnt/h microvm.share=good:/mnt/good "
            "microvm.volume=tmpfs:/mnt/h/to-root/pwned1:tmpfs "
            "microvm.volume=tmpfs:/mnt/h/up/pwned2:tmpfs "
            "microvm.volume=tmpfs:/mnt/h/etc/pwned3:tmpfs"
        ),
    )
    run = run_agent(
        vm,
        "mount-all --root /sysroot",
        before="mkdir -p /sysroot && mount -t tmpfs sysroot /sysroot",
        after="cat /sysroot/mnt/good/f",
    )
    assert run.rc == 1, run
    assert "Traceback" not in run.boot.results
    errors = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
    for spec in (
        "microvm.share=onlytag: expected TAG:WHERE[:PROTO[:OPTIONS]]",
        "microvm.share=x:/../../etc: ",
        "microvm.share=y:relative: ",
        "microvm.volume=nonsense:/v: ",
        "microvm.share=z:/a:carrier-pigeon: ",
        "microvm.store-overlay=/nix/.ro-store: ",
    ):
        assert sum(1 for e in errors if e.startswith(f"error: {spec}")) == 1, (spec, errors)
    assert len(errors) == 6, errors
    new = run.new_mounts()
    assert new, run
    for point in new:
        assert point == "/sysroot" or point.startswith("/sysroot/"), point
    # Symlinks in the share were followed as if /sysroot were the root.
    for n, where in ((1, "/sysroot/pwned1"), (2, "/sysroot/pwned2"), (3, "/sysroot/etc/pwned3")):
        assert new[where].fstype == "tmpfs", (n, sorted(new))
    assert run.out.strip() == "ok"
    assert not (hostile / "pwned1").exists()


@pytest.mark.parametrize(
    ("cpus", "types"),
    [
        (1, ("", "", "")),  # found by looking (auto)
        # Two CPUs: the drivers and the named filesystems' modules load in parallel.
        (2, (":9p", ":virtiofs", ":ext4")),
    ],
)
def test_coldplug_loads_the_drivers_itself(
    make_vm: MakeVM, tmp_path: Path, cpus: int, types: tuple[str, str, str]
) -> None:
    rw = tb.ext4_image(tmp_path / "rw.img", label="rw")
    vm = make_vm(
        shares=[_share(tmp_path, "s9", x="1\n"), _share(tmp_path, "sfs", "virtiofs")],
        disks=[tb.Disk(rw)],
        # initcall_debug: the kernel logs each module init with the task that loaded it.
        cmdline="initcall_debug microvm.share=s9:/a{} microvm.share=sfs:/b{} "
        "microvm.volume=LABEL=rw:/c{}".format(*types),
        cpus=cpus,
    )
    run = run_agent(
        vm,
        # No helper for the kernel's own module requests either: only the agent loads modules.
        before="echo /bin/false > /proc/sys/kernel/modprobe; "
        "cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ' > /tmp/mods-before",
        after='echo "before: $(cat /tmp/mods-before)"; '
        "echo \"after: $(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ')\"; "
        "echo \"inits: $(dmesg | sed -n 's/.*calling  *[^ ]* \\[\\([^]]*\\)\\] @ \\([0-9]*\\).*/\\1@\\2/p'"
        " | tr '\\n' ' ')\"",
    )
    assert run.rc == 0, run
    lines = dict(x.split(":", 1) for x in run.out.splitlines())
    before, after = set(lines["before"].split()), set(lines["after"].split())
    assert before == set(), before  # nothing loaded before the agent, and no udev
    # The drivers of the devices present, and the filesystems used (where not built in).
    builtin = _builtin(vm)
    for module in ("virtio_pci", "9pnet_virtio", "9p", "virtio_blk", "ext4", "virtiofs"):
        assert (module in after) != (module in builtin), (module, after)
    assert {"/a", "/b", "/c"} <= set(run.mounts)
    assert (run.mounts["/a"].fstype, run.mounts["/b"].fstype) == ("9p", "virtiofs")
    assert run.mounts["/c"].fstype == "ext4"
    assert "warning" not in run.stderr, run.stderr
    # Which tasks ran the module inits: the agent's one thread, or (two CPUs) several at once.
    loaders = {word.split("@")[1] for word in lines["inits"].split()}
    assert len(lines["inits"].split()) >= 3, lines["inits"]
    assert (len(loaders) == 1) if cpus == 1 else (len(loaders) >= 2), lines["inits"]


def test_blacklist_and_modprobe_d_options_as_modprobe_applies_them(
    make_vm: MakeVM, tmp_path: Path
) -> None:
    """`modprobe.blacklist=` keeps coldplug from loading a driver (the 9p share then times
    out, nofail); an `options` line of modprobe.d reaches the module it names."""
    rw = tb.ext4_image(tmp_path / "rw.img", label="rw")
    vm = make_vm(
        shares=[_share(tmp_path, "s9", x="1\n")],
        disks=[tb.Disk(rw)],
        cmdline="modprobe.blacklist=9pnet_virtio "
        "microvm.share=s9:/a:9p:nofail,x-device-timeout=2 microvm.volume=LABEL=rw:/c",
    )
    run = run_agent(
        vm,
        before="echo /bin/false > /proc/sys/kernel/modprobe",
        after="echo \"modules: $(cut -d' ' -f1 /proc/modules | tr '\\n' ' ')\"; "
        'echo "depth: $(cat /sys/module/virtio_blk/parameters/queue_depth)"',
        files={"etc/modprobe.d/blk.conf": "options virtio_blk queue_depth=48\n"},
    )
    assert run.rc == 0, run  # the share is nofail
    lines = dict(x.split(":", 1) for x in run.out.splitlines())
    modules = set(lines["modules"].split())
    assert "9pnet_virtio" not in modules and "virtio_blk" in modules, modules
    assert lines["depth"].strip() == "48"
    assert "/c" in run.mounts and "/a" not in run.mounts
    assert "microvm.share=s9:/a:9p:nofail,x-device-timeout=2" in run.stderr, run.stderr


def _builtin(vm: tb.VM) -> set[str]:
    path = vm.testbed.kernel_dir(vm.kernel) / "modules" / "modules.builtin"
    return {
        Path(line).name.removesuffix(".ko").replace("-", "_") for line in path.read_text().split()
    }


def test_json_config_with_cmdline_override(make_vm: MakeVM, tmp_path: Path) -> None:
    rw = tb.ext4_image(tmp_path / "rw.img", label="rw-store")
    config = {
        "shares": [
            {"tag": "ro-store", "mountPoint": "/nix/.ro-store", "proto": "9p"},
            {"tag": "from-file", "mountPoint": "/srv/data"},
        ],
        "volumes": [{"label": "rw-store", "mountPoint": "/nix/.rw-store", "fsType": "ext4"}],
        "storeOverlay": {"lower": "/nix/.ro-store", "rw": "/nix/.rw-store"},
    }
    vm = make_vm(
        shares=[
            _share(tmp_path, "ro-store", pkg="p\n"),
            _share(tmp_path, "from-cmdline", "virtiofs", who="cmdline\n"),
        ],
        disks=[tb.Disk(rw)],
        cmdline="microvm.share=from-cmdline:/srv/data",
    )
    run = run_agent(
        vm,
        files={"etc/guest-agent/mounts.json": json.dumps(config)},
        after="cat /srv/data/who; ls /nix/store; echo @@status@@; guest-agent status --json"
        " 2>/dev/null; echo @@text@@; guest-agent status 2>/tmp/status.err; echo @@statuserr@@;"
        " cat /tmp/status.err; echo @@setfd@@; python3 -c"
        f" '{SET_FD_PROBE}'",
    )
    assert run.rc == 0, run
    assert run.mounts["/srv/data"].source == "from-cmdline"
    assert "replaces" in run.stderr
    assert run.mounts["/nix/store"].fstype == "overlay"
    lines = run.out.split("\n")
    assert lines[0] == "cmdline" and lines[1].split() == ["pkg"], run.out
    parts = sections(run.boot.results)
    status = json.loads(parts["status"])
    # the file's entry the command line replaced is named, as a warning (the documented
    # precedence: status still ok); nothing else is wrong
    assert (status["version"], status["ok"]) == (1, True), parts
    assert status["problems"] == [
        {
            "spec": "/etc/guest-agent/mounts.json: shares[1] (tag from-file)",
            "reason": "not mounted: microvm.share=from-cmdline:/srv/data replaces it"
            " (same mount point /srv/data)",
            "hint": None,
            "fatal": False,
        }
    ], parts
    rows = {row["where"]: row for row in status["mounts"]}
    assert {where: row["state"] for where, row in rows.items()} == {
        "/nix/.ro-store": "mounted",
        "/nix/.rw-store": "mounted",
        "/srv/data": "mounted",
        "/nix/store": "mounted",
    }
    # The overlay's layers, legible: the configured paths, what the kernel shows (the fds
    # the agent gave it), and the upper one checked (9p lower, ext4 upper: by filesystem).
    layers = rows["/nix/store"]["layers"]
    paths = {name: layer["path"] for name, layer in layers.items()}
    assert paths == {
        "lower": "/nix/.ro-store", "upper": "/nix/.rw-store/store", "work": "/nix/.rw-store/work",
    }  # fmt: skip
    assert all(layer["kernel_shows"].startswith("/proc/self/fd/") for layer in layers.values())
    checks = [(layers[n]["matches"], layers[n]["checked_by"]) for n in ("lower", "upper", "work")]
    assert checks == [(None, None), (True, "filesystem"), (None, None)], layers
    # the boot record of the run above, beside the live view (stderr; JSON: "boot")
    assert parts["statuserr"].splitlines()[-1].startswith("at boot ("), parts["statuserr"]
    assert "exit status 0): " in parts["statuserr"], parts["statuserr"]
    assert status["boot"]["exit_status"] == 0 and status["boot"]["mounts"], status["boot"]
    text = [line.strip() for line in parts["text"].splitlines()]
    assert text[-3].startswith("lower /nix/.ro-store (the kernel shows /proc/self/fd/"), text
    assert text[-2].startswith("upper /nix/.rw-store/store (the kernel shows /proc/self/fd/")
    assert text[-2].endswith(": on the configured filesystem)"), text
    # Overlay layers by fd (FSCONFIG_SET_FD, `lowerdir+`) came with Linux 6.13: our kernels
    # refuse them (docs/design.md "Mounting"); when the test bed's kernels take them, the
    # agent can give its layers that way and mountinfo shows paths: revisit.
    refused = {"6.1": "95", "6.12": "22"}[vm.kernel]  # EOPNOTSUPP, EINVAL
    assert parts["setfd"].split()[:2] == ["refused", refused], parts["setfd"]


# Offers the lower layer to overlayfs by fd, as `lowerdir+` (FSCONFIG_SET_FD = 5): prints
# "accepted", or "refused ERRNO" and the kernel's own message.
SET_FD_PROBE = (
    "import os; from guest_agent.kernel import mount as m, syscalls as s;"
    ' fs = s.fsopen("overlay"); d = os.open("/nix/.ro-store", os.O_RDONLY | os.O_DIRECTORY)\n'
    'try: s.syscall(431, fs, 5, b"lowerdir+", None, d); print("accepted")\n'
    'except OSError as e: print("refused", e.errno, m._drain_messages(fs))'
)


def test_progress_reaches_the_kernel_log(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = make_vm(shares=[_share(tmp_path, "logged", f="x\n")], cmdline="microvm.share=logged:/l")
    run = run_agent(vm, after="dmesg | grep 'guest-agent:'")
    assert run.rc == 0, run
    assert "guest-agent: mounted 9p logged at /l (msize=512000, cache=mmap, rw)" in run.out, run.out


def test_status_reports_what_is_not_mounted(make_vm: MakeVM, tmp_path: Path) -> None:
    vm = make_vm(shares=[_share(tmp_path, "here", f="x\n")], cmdline="microvm.share=here:/here")
    run = run_agent(vm, "status --json")
    assert run.rc == 1, run
    out = json.loads(run.stdout)
    assert out == {
        "version": 1,
        "ok": False,
        "mounts": [
            {
                "where": "/here",
                "spec": "microvm.share=here:/here",
                "required": True,
                "fstype": None,
                "source": None,
                "state": "not-mounted",
                "detail": "nothing mounted there",
                "reset_pending": None,
                "nix_db": None,
                "layers": None,
            }
        ],
        "problems": [],
        "boot": None,  # no mount-all ran in this boot: no record
    }, out

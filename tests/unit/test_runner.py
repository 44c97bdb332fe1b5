"""The runner with a fake Devices and a recording mount function: present devices first,
failures as problems, steps under a failed mount skipped, the mount log."""

from __future__ import annotations

from pathlib import Path

import pytest
from handler_fakes import FakeDevices, Run

from guest_agent.config.merge import merge, parse_cmdline
from guest_agent.plan import plan
from guest_agent.results import Status
from guest_agent.runner import Runner


def steps_of(cmdline: str) -> list:  # type: ignore[type-arg]
    config, problems = merge([parse_cmdline(cmdline)])
    assert problems == ()
    steps, problems = plan(config)
    assert problems == []
    return steps


def test_present_first_then_the_waits_and_skips_below_a_failure(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices({"here": ("virtiofs", False)}))
    steps = steps_of(
        "microvm.share=late:/a microvm.volume=tmpfs:/a/c:tmpfs "
        "microvm.share=here:/b microvm.volume=tmpfs:/z:tmpfs:nofail"
    )
    results = Runner(run.ctx).run(steps)
    assert [(r.where, r.status) for r in results] == [
        ("/b", Status.MOUNTED),
        ("/z", Status.MOUNTED),
        ("/a", Status.FAILED),
        ("/a/c", Status.SKIPPED),
    ]
    problems = run.ctx.reporter.problems
    assert [p.spec for p in problems] == [
        "microvm.share=late:/a",
        "microvm.volume=tmpfs:/a/c:tmpfs",
    ]
    assert problems[1].reason == "not mounted: it needs /a mounted first, which is not"
    assert all(p.fatal for p in problems)
    assert run.log.in_place("/b") and not run.log.in_place("/a")
    assert [r.target for r in run.mount.requests] == [run.host("/b"), run.host("/z")]


def test_dry_run_looks_for_no_device(tmp_path: Path) -> None:
    run = Run(tmp_path, dry_run=True)
    results = Runner(run.ctx).run(steps_of("microvm.share=late:/a microvm.volume=tmpfs:/a/c:tmpfs"))
    assert [r.status for r in results] == [Status.WOULD_MOUNT, Status.WOULD_MOUNT]
    assert run.devices.coldplugged == 0 and run.mount.requests == []


def test_mount_log_undo_unmounts_newest_first(monkeypatch: object) -> None:
    import guest_agent.kernel.mount as kernel_mount
    from guest_agent.results import MountLog

    undone: list[str] = []
    monkeypatch.setattr(kernel_mount, "umount", lambda target, lazy=False: undone.append(target))  # type: ignore[attr-defined]
    with MountLog() as log:
        log.mounted("/r/a")
        log.mounted("/r/b")
    assert undone == ["/r/b", "/r/a"]


def test_a_symlink_in_the_root_orders_by_where_mount_points_resolve(tmp_path: Path) -> None:
    run = Run(tmp_path)
    (run.root / "var/home").mkdir(parents=True)
    (run.root / "home").symlink_to("var/home")
    steps = steps_of("microvm.volume=tmpfs:/home/alice:tmpfs microvm.volume=tmpfs:/var/home:tmpfs")
    assert [s.where for s in steps] == ["/home/alice", "/var/home"]
    results = Runner(run.ctx).run(steps)
    assert [(r.where, r.status) for r in results] == [
        ("/var/home", Status.MOUNTED),
        ("/home/alice", Status.MOUNTED),
    ]
    assert [r.target for r in run.mount.requests] == [
        run.host("/var/home"),
        run.host("/var/home/alice"),
    ]


def test_without_a_symlink_on_the_way_no_mount_point_is_walked_for_the_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import guest_agent.runner as runner_module

    def walked(_root_fd: int, where: str) -> str:
        raise AssertionError(f"walked {where}")

    monkeypatch.setattr(runner_module, "resolve_as_far_as_exists", walked)
    run = Run(tmp_path)
    (run.root / "var/lib").mkdir(parents=True)
    (run.root / "file").write_text("")
    steps = steps_of(
        "microvm.volume=tmpfs:/var/lib/a:tmpfs microvm.volume=tmpfs:/missing/b:tmpfs "
        "microvm.volume=tmpfs:/file/c:tmpfs:nofail microvm.volume=tmpfs:/var:tmpfs"
    )
    results = Runner(run.ctx).run(steps)
    assert [r.where for r in results] == [s.where for s in steps]
    (run.root / "link").symlink_to("var")
    with pytest.raises(AssertionError, match=r"^walked "):
        Runner(run.ctx).run(steps_of("microvm.volume=tmpfs:/link/x:tmpfs"))


def test_devices_told_the_filesystems_the_plan_names_before_anything_runs(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path, FakeDevices())
    Runner(run.ctx).run(
        steps_of(
            "microvm.share=a:/a:9p microvm.share=b:/b microvm.volume=LABEL=x:/x:ext4 "
            "microvm.volume=LABEL=y:/y microvm.volume=tmpfs:/t:tmpfs "
            "microvm.share=ro-store:/nix/.ro-store:virtiofs "
            "microvm.store-overlay=/nix/.ro-store:/x"
        )
    )
    # `auto` names none; the store overlay names overlay
    assert run.ctx.devices.named_filesystems == {"9p", "ext4", "tmpfs", "virtiofs", "overlay"}

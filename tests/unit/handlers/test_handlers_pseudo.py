"""The tmpfs/ramfs handler with a fake Devices and a recording mount function."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from handler_fakes import FakeDevices, RecordingMount, Run

from guest_agent.config.parsers import parse_volume
from guest_agent.handlers import handler_for
from guest_agent.handlers.pseudo import PseudoHandler
from guest_agent.kernel.mount import MountError
from guest_agent.results import Failure, Status
from guest_agent.spec import PseudoSpec


def pseudo(text: str) -> PseudoSpec:
    spec = parse_volume(text, f"microvm.volume={text}")
    assert isinstance(spec, PseudoSpec)
    return spec


def test_handler_for_tmpfs_and_ramfs() -> None:
    for spec in (pseudo("tmpfs:/t:tmpfs"), pseudo("scratch:/r:ramfs")):
        handler = handler_for(spec)
        assert isinstance(handler, PseudoHandler) and handler.spec is spec


def test_always_present_without_coldplug(tmp_path: Path) -> None:
    run = Run(tmp_path)
    assert PseudoHandler(pseudo("tmpfs:/t:tmpfs")).present(run.ctx)
    assert run.devices.coldplugged == 0


def test_mount(tmp_path: Path) -> None:
    run = Run(tmp_path)
    result = PseudoHandler(pseudo("tmpfs:/run/x:tmpfs:size=8m,mode=0755")).mount(run.ctx)
    (request,) = run.mount.requests
    assert (request.fstype, request.source, request.target) == (
        "tmpfs",
        "tmpfs",
        run.host("/run/x"),
    )
    assert request.options == ("size=8m", "mode=0755")
    assert result.status == Status.MOUNTED
    assert run.lines() == ["mounted tmpfs tmpfs at /run/x (rw)"]
    assert run.devices.filesystems == ["tmpfs"]


def test_store_lower_is_read_only(tmp_path: Path) -> None:
    run = Run(tmp_path)
    result = PseudoHandler(pseudo("scratch:/s:ramfs")).mount(run.ctx, store_lower=True)
    assert result.options == ("ro",)
    assert run.lines() == ["mounted ramfs scratch at /s (ro)"]


def test_dry_run(tmp_path: Path) -> None:
    run = Run(tmp_path, dry_run=True)
    result = PseudoHandler(pseudo("tmpfs:/x:tmpfs:size=8m")).dry_run(run.ctx)
    assert result == (
        "/x", "microvm.volume=tmpfs:/x:tmpfs:size=8m", Status.WOULD_MOUNT, "tmpfs", "tmpfs",
        ("size=8m",), None,
    )  # fmt: skip
    assert run.mount.requests == [] and not (run.root / "x").exists()


def test_already_mounted_and_occupied(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.mounted("/x", "tmpfs", "tmpfs")
    run.mounted("/y", "ext4", "/dev/vda")
    assert PseudoHandler(pseudo("tmpfs:/x:tmpfs")).mount(run.ctx).status == Status.ALREADY_MOUNTED
    assert PseudoHandler(pseudo("tmpfs:/x:tmpfs")).dry_run(run.ctx).status == Status.ALREADY_MOUNTED
    with pytest.raises(Failure, match=r"^/y already has ext4 from /dev/vda mounted on it"):
        PseudoHandler(pseudo("tmpfs:/y:tmpfs")).mount(run.ctx)
    assert run.mount.requests == []


def test_unsupported_and_refused(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices(unsupported={"ramfs": "not built"}))
    with pytest.raises(Failure, match=r"^the kernel does not support ramfs: not built$"):
        PseudoHandler(pseudo("r:/r:ramfs")).mount(run.ctx)
    mount = RecordingMount(MountError(errno.EINVAL, "fsconfig", "tmpfs: Unknown parameter 'bogus'"))
    run = Run(tmp_path, mount=mount)
    with pytest.raises(Failure) as caught:
        PseudoHandler(pseudo("tmpfs:/t:tmpfs:bogus")).mount(run.ctx)
    assert caught.value.reason == (
        "the kernel refused to mount tmpfs (fsconfig): Invalid argument: tmpfs: Unknown parameter 'bogus'"
    )
    assert caught.value.hint is None


def test_matches_by_fstype(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.mounted("/a", "tmpfs", "whatever")
    run.mounted("/b", "ramfs", "tmpfs")
    table = run.ctx.table()
    spec = pseudo("tmpfs:/x:tmpfs")
    assert PseudoHandler(spec).matches(table.at(run.host("/a")), run.devices)  # type: ignore[arg-type]
    assert not PseudoHandler(spec).matches(table.at(run.host("/b")), run.devices)  # type: ignore[arg-type]

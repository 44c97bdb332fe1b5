"""The share handler with a fake Devices and a recording mount function: nothing mounts."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from handler_fakes import FakeDevices, RecordingMount, Run

from guest_agent.config.parsers import parse_share
from guest_agent.handlers import handler_for
from guest_agent.handlers.share import ShareHandler
from guest_agent.kernel.mount import MountError
from guest_agent.results import Failure, Status
from guest_agent.spec import ShareSpec


def share(text: str) -> ShareSpec:
    spec = parse_share(text, f"microvm.share={text}")
    assert isinstance(spec, ShareSpec)
    return spec


def test_handler_for_a_share() -> None:
    spec = share("home:/home")
    handler = handler_for(spec)
    assert isinstance(handler, ShareHandler) and handler.spec is spec


def test_present_looks_first_and_coldplugs_only_for_a_missing_tag(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices({"home": ("virtiofs", False)}))
    assert ShareHandler(share("home:/home")).present(run.ctx)
    assert run.devices.coldplugged == 0  # there: no uevent socket, no driver scan
    assert not ShareHandler(share("other:/o")).present(run.ctx)
    assert not ShareHandler(share("third:/t")).present(run.ctx)
    assert run.devices.coldplugged == 1  # missing: coldplug once, then look again


def test_mount_9p_with_defaults(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices({"ro-store": ("9p", False)}))
    result = ShareHandler(share("ro-store:/nix/.ro-store")).mount(run.ctx, store_lower=True)
    (request,) = run.mount.requests
    options = ("trans=virtio", "version=9p2000.L", "msize=512000", "cache=loose", "ro")
    assert (request.fstype, request.source, request.target) == (
        "9p",
        "ro-store",
        run.host("/nix/.ro-store"),
    )
    assert request.options == options
    assert result.status == Status.MOUNTED and result.options == options
    assert run.lines() == ["mounted 9p ro-store at /nix/.ro-store (msize=512000, cache=loose, ro)"]
    assert run.devices.filesystems == ["9p"]
    assert run.log.last_host() == run.host("/nix/.ro-store")
    assert (run.root / "nix/.ro-store").is_dir()


def test_mount_virtiofs_rw(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices({"home": ("virtiofs", False)}))
    result = ShareHandler(share("home:/home")).mount(run.ctx)
    assert [r.options for r in run.mount.requests] == [()]
    assert result.fstype == "virtiofs"
    assert run.lines() == ["mounted virtiofs home at /home (rw)"]


def test_dry_run_mounts_nothing(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices(), dry_run=True)
    result = ShareHandler(share("home:/home:9p")).dry_run(run.ctx)
    assert result.status == Status.WOULD_MOUNT
    assert (result.fstype, result.source) == ("9p", "home")
    assert result.options == ("trans=virtio", "version=9p2000.L", "msize=512000", "cache=mmap")
    assert run.mount.requests == [] and run.devices.coldplugged == 0
    assert not (run.root / "home").exists()


def test_already_mounted(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices({"home": ("virtiofs", False)}))
    run.mounted("/home", "virtiofs", "home")
    result = ShareHandler(share("home:/home")).mount(run.ctx)
    assert result.status == Status.ALREADY_MOUNTED and run.mount.requests == []
    assert run.lines() == ["/home: already mounted (virtiofs home)"]


def test_something_else_mounted_there(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices({"home": ("virtiofs", False)}))
    run.mounted("/home", "tmpfs", "tmpfs")
    with pytest.raises(Failure, match="/home already has tmpfs from tmpfs mounted on it"):
        ShareHandler(share("home:/home")).mount(run.ctx)
    # the same tag over the other transport is something else too
    (tmp_path / "2").mkdir()
    run2 = Run(tmp_path / "2")
    run2.mounted("/home", "virtiofs", "home")
    with pytest.raises(Failure, match="already has virtiofs from home"):
        ShareHandler(share("home:/home:9p")).mount(run2.ctx)


def test_a_9p_channel_mounts_once(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices({"data": ("9p", False)}))
    run.mounted("/elsewhere", "9p", "data")
    with pytest.raises(Failure) as caught:
        ShareHandler(share("data:/data")).mount(run.ctx)
    assert (
        caught.value.reason
        == "9p tag 'data' is already mounted at /elsewhere: a 9p channel mounts once"
    )
    assert caught.value.hint == "bind-mount that directory instead"


def test_timeout_names_what_was_seen(tmp_path: Path) -> None:
    run = Run(tmp_path, FakeDevices({"other": ("9p", False)}, events=2))
    with pytest.raises(Failure) as caught:
        ShareHandler(share("home:/home:virtiofs:x-device-timeout=3")).mount(run.ctx)
    assert (
        caught.value.reason
        == "no virtiofs share tagged 'home' appeared within 3 s (seen: 9p 'other')"
    )
    assert run.devices.waits == 3 and run.mount.requests == []


def test_blind_virtiofs_retries_until_the_mount_works(tmp_path: Path) -> None:
    mount = RecordingMount(
        MountError(errno.EINVAL, "fsconfig"), MountError(errno.ENOENT, "fsconfig")
    )
    run = Run(tmp_path, FakeDevices({"home": ("virtiofs", True)}, events=2), mount)
    result = ShareHandler(share("home:/home")).mount(run.ctx)
    assert result.status == Status.MOUNTED and len(mount.requests) == 3


def test_blind_virtiofs_gives_up_at_the_deadline(tmp_path: Path) -> None:
    # one try per look: the first, the one after the coldplug, the one after the uevent
    mount = RecordingMount(*[MountError(errno.EINVAL, "fsconfig")] * 3)
    run = Run(tmp_path, FakeDevices({"home": ("virtiofs", True)}, events=1), mount)
    with pytest.raises(Failure, match=r"^no virtio share tagged 'home' appeared within 10 s"):
        ShareHandler(share("home:/home")).mount(run.ctx)
    assert len(mount.requests) == 3


def test_refusal_of_a_listed_tag_is_not_retried(tmp_path: Path) -> None:
    mount = RecordingMount(MountError(errno.EINVAL, "fsconfig", "bad option"))
    run = Run(tmp_path, FakeDevices({"home": ("virtiofs", False)}, events=3), mount)
    with pytest.raises(Failure) as caught:
        ShareHandler(share("home:/home")).mount(run.ctx)
    assert (
        caught.value.reason
        == "the kernel refused to mount virtiofs (fsconfig): Invalid argument: bad option"
    )
    assert len(mount.requests) == 1


def test_unsupported_filesystem(tmp_path: Path) -> None:
    run = Run(
        tmp_path, FakeDevices({"home": ("virtiofs", False)}, unsupported={"virtiofs": "no module"})
    )
    with pytest.raises(Failure, match=r"^the kernel does not support virtiofs: no module$"):
        ShareHandler(share("home:/home")).mount(run.ctx)


def test_share_whose_host_dir_is_gone_is_unmounted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guest_agent.handlers import share as share_module

    run = Run(tmp_path, FakeDevices({"home": ("virtiofs", False)}))
    host = run.host("/home")
    unmounted: list[str] = []
    monkeypatch.setattr(share_module, "umount", lambda target, lazy=False: unmounted.append(target))
    real_stat = os.stat

    def stat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)  # type: ignore[arg-type]
        if path == host:
            values = list(st)
            values[3] = 0  # st_nlink
            return os.stat_result(values)
        return st

    monkeypatch.setattr(share_module.os, "stat", stat)
    with pytest.raises(Failure) as caught:
        ShareHandler(share("home:/home")).mount(run.ctx)
    assert caught.value.reason == (
        "virtiofs share 'home' mounted but is unusable, so it was unmounted again: "
        "its root directory has been deleted on the host (it has no links)"
    )
    assert unmounted == [host] and run.log.last_host() is None


def test_matches(tmp_path: Path) -> None:
    run = Run(tmp_path)
    run.mounted("/a", "9p", "home")
    run.mounted("/b", "virtiofs", "other")
    table = run.ctx.table()
    spec = share("home:/home")
    assert ShareHandler(spec).matches(table.at(run.host("/a")), run.devices)  # type: ignore[arg-type]
    assert not ShareHandler(spec).matches(table.at(run.host("/b")), run.devices)  # type: ignore[arg-type]

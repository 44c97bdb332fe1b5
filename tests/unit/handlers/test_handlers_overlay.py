"""The store overlay handler on real directories of a temporary root, with a fake Devices
and a recording mount function: the checks and the reset run for real, nothing mounts."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from handler_fakes import FakeDevices, RecordingMount, Run

from guest_agent import reset as overlay_reset
from guest_agent.config.parsers import parse_overlay
from guest_agent.handlers import handler_for
from guest_agent.handlers.overlay import OverlayHandler
from guest_agent.kernel.mount import MountError
from guest_agent.results import Failure, Status
from guest_agent.spec import OverlaySpec

SPEC = parse_overlay("/lower:/rw", "microvm.store-overlay=/lower:/rw")
assert isinstance(SPEC, OverlaySpec)
SAFE = ("index=off", "metacopy=off", "redirect_dir=off", "xino=off")


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    run = Run(tmp_path)
    (run.root / "lower").mkdir()
    (run.root / "rw").mkdir()
    monkeypatch.setattr(overlay_reset, "empty_trash_in_background", lambda trash: None)
    return run


def test_handler_for_the_overlay() -> None:
    handler = handler_for(SPEC)
    assert isinstance(handler, OverlayHandler) and handler.spec is SPEC


def test_always_present(run: Run) -> None:
    assert OverlayHandler(SPEC).present(run.ctx) and run.devices.coldplugged == 0


def test_mount_hands_the_layers_as_fds(run: Run) -> None:
    result = OverlayHandler(SPEC).mount(run.ctx)
    (request,) = run.mount.requests
    assert (request.fstype, request.source, request.target) == (
        "overlay",
        "overlay",
        run.host("/nix/store"),
    )
    lower, upper, work, *rest = request.options
    for option, name in ((lower, "lowerdir"), (upper, "upperdir"), (work, "workdir")):
        assert option.startswith(f"{name}=/proc/self/fd/")
    assert tuple(rest) == SAFE
    assert result.status == Status.MOUNTED
    # the result shows the layers as the guest sees them: no fd, no --root prefix
    assert result.options == (
        "lowerdir=/lower", "upperdir=/rw/store", "workdir=/rw/work", *SAFE,
    )  # fmt: skip
    assert run.lines() == ["mounted overlay at /nix/store (lower /lower, upper /rw/store)"]
    assert (run.root / "rw/store").is_dir() and (run.root / "rw/work").is_dir()
    assert run.devices.filesystems == ["overlay"]


def test_dry_run_makes_nothing(run: Run) -> None:
    run.ctx.dry_run = True
    result = OverlayHandler(SPEC).dry_run(run.ctx)
    assert result.status == Status.WOULD_MOUNT
    assert result.options[0] == "lowerdir=/lower"
    assert run.mount.requests == [] and not (run.root / "rw/store").exists()


def test_already_mounted_and_a_scheduled_reset(run: Run) -> None:
    run.mounted("/nix/store", "overlay", "overlay")
    fd = os.open(run.root / "rw", os.O_RDONLY | os.O_DIRECTORY)
    try:
        overlay_reset.schedule(fd)
    finally:
        os.close(fd)
    result = OverlayHandler(SPEC).mount(run.ctx)
    assert result.status == Status.ALREADY_MOUNTED
    assert run.lines() == [
        "/nix/store is already mounted: the scheduled reset applies at the next boot",
        "/nix/store: already mounted (overlay overlay)",
    ]


def test_occupied(run: Run) -> None:
    run.mounted("/nix/store", "tmpfs", "tmpfs")
    with pytest.raises(Failure, match=r"^/nix/store already has tmpfs from tmpfs mounted on it"):
        OverlayHandler(SPEC).mount(run.ctx)


def test_a_name_the_agent_owns_of_the_wrong_type(run: Run) -> None:
    (run.root / "rw/store").symlink_to("/etc")
    with pytest.raises(Failure) as caught:
        OverlayHandler(SPEC).mount(run.ctx)
    assert caught.value.reason.startswith("/rw/store")
    assert "(a name the agent owns): refusing to follow or delete it" in caught.value.reason
    assert caught.value.hint == "remove /rw/store by hand if it is not yours"
    assert run.mount.requests == []


def test_layers_overlapping_through_a_link(run: Run) -> None:
    (run.root / "lower").rmdir()
    (run.root / "rw/store").mkdir()
    (run.root / "lower").symlink_to("rw/store")
    with pytest.raises(Failure) as caught:
        OverlayHandler(SPEC).mount(run.ctx)
    assert caught.value.reason.startswith("the lower layer /lower and /rw overlap")
    assert caught.value.hint == "LOWER and RW must be separate directories"


def test_upper_in_use_by_another_overlay(run: Run) -> None:
    (run.root / "rw/store").mkdir()
    run.mounted("/elsewhere", "overlay", "overlay", f"rw,upperdir={run.host('/rw/store')}")
    with pytest.raises(Failure) as caught:
        OverlayHandler(SPEC).mount(run.ctx)
    assert caught.value.reason == (
        "the upper layer /rw/store is in use by the overlay mounted at /elsewhere:"
        " not mounting it a second time"
    )


def test_upper_on_9p_is_refused_and_on_virtiofs_gets_userxattr(run: Run, tmp_path: Path) -> None:
    run.mounted("/rw", "9p", "rwtag")
    with pytest.raises(Failure, match=r"^the upper layer /rw is on 9p \(rwtag at "):
        OverlayHandler(SPEC).mount(run.ctx)
    run.mountinfo.write_text("")
    run.mounted("/rw", "virtiofs", "rwtag")
    result = OverlayHandler(SPEC).mount(run.ctx)
    assert "userxattr" in result.options
    assert (
        run.lines()[-1]
        == "mounted overlay at /nix/store (lower /lower, upper /rw/store, userxattr)"
    )


def test_reset_requested_moves_the_upper_layer_aside(run: Run) -> None:
    (run.root / "rw/store/pkg").mkdir(parents=True)
    run.ctx.reset_requested = True
    OverlayHandler(SPEC).mount(run.ctx)
    assert run.lines()[0] == (
        "reset the /nix/store upper layer: moved 1 dir(s) of /rw aside, deleting them in the background"
    )
    assert list((run.root / "rw/store").iterdir()) == []


def test_unsupported_and_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(overlay_reset, "empty_trash_in_background", lambda trash: None)
    run = Run(tmp_path, FakeDevices(unsupported={"overlay": "no module"}))
    (run.root / "lower").mkdir()
    with pytest.raises(Failure, match=r"^the kernel does not support overlay: no module$"):
        OverlayHandler(SPEC).mount(run.ctx)
    run = Run(tmp_path, mount=RecordingMount(MountError(errno.EINVAL, "fsconfig", "overlay: bad")))
    with pytest.raises(Failure, match=r"^the kernel refused to mount overlay \(fsconfig\): "):
        OverlayHandler(SPEC).mount(run.ctx)


def test_missing_lower_is_an_error(run: Run) -> None:
    (run.root / "lower").rmdir()
    with pytest.raises(Exception, match="lower"):
        OverlayHandler(SPEC).mount(run.ctx)


def test_matches_any_overlay(run: Run) -> None:
    run.mounted("/a", "overlay", "overlay")
    run.mounted("/b", "tmpfs", "overlay")
    table = run.ctx.table()
    assert OverlayHandler(SPEC).matches(table.at(run.host("/a")), run.devices)  # type: ignore[arg-type]
    assert not OverlayHandler(SPEC).matches(table.at(run.host("/b")), run.devices)  # type: ignore[arg-type]

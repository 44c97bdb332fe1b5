"""The one `--json` shape of mount-all, status and discover, pinned: the top level, the
fields of each list's items and of each problem, and their types (never values that
depend on the machine). docs/reference.md "JSON output" documents the same constants
(tests/unit/test_reference_outputs.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from guest_agent.cli import JSON_KEYS, JSON_VERSION, PROBLEM_FIELDS, status_overlay
from guest_agent.cli import discover as discover_cmd
from guest_agent.cli import status as status_cmd
from guest_agent.cli.app import main
from guest_agent.cli.status import STATUS_FIELDS
from guest_agent.cli.status_overlay import LAYER_FIELDS, LAYER_NAMES, overlay_layers
from guest_agent.kernel.mountinfo import Mount
from guest_agent.results import MOUNT_FIELDS
from guest_agent.spec import OverlaySpec, Problem

STR, OPT_STR, BOOL, OPT_BOOL = (str,), (str, type(None)), (bool,), (bool, type(None))
MOUNT_TYPES = {"where": STR, "spec": STR, "status": STR, "fstype": OPT_STR,
               "source": OPT_STR, "options": (list,), "message": OPT_STR}  # fmt: skip
STATUS_TYPES = {"where": STR, "spec": STR, "required": BOOL, "fstype": OPT_STR,
                "source": OPT_STR, "state": STR, "detail": STR, "reset_pending": OPT_BOOL,
                "nix_db": (dict, type(None)), "layers": (dict, type(None))}  # fmt: skip
DEVICE_TYPES = {"kind": STR, "name": STR, "source": OPT_STR, "fstype": OPT_STR,
                "transport": OPT_STR, "serial": OPT_STR, "label": OPT_STR, "uuid": OPT_STR,
                "size": (int, type(None)), "read_only": OPT_BOOL, "partition": OPT_BOOL}  # fmt: skip
PROBLEM_TYPES = {"spec": STR, "reason": STR, "hint": OPT_STR, "fatal": BOOL}


def check_shape(
    out: dict[str, Any], key: str, types: dict[str, tuple[type, ...]], extra: tuple[str, ...] = ()
) -> None:
    assert list(out) == [key if k == "LIST" else k for k in JSON_KEYS] + list(extra)
    assert out["version"] == JSON_VERSION == 1
    assert isinstance(out["ok"], bool)
    assert out[key], "the shape of an item is pinned only when there is one"
    for item in out[key]:
        assert list(item) == list(types), item
        for field, value in item.items():
            assert isinstance(value, types[field]), (field, value)
    assert out["problems"], "the shape of a problem is pinned only when there is one"
    for problem in out["problems"]:
        assert list(problem) == list(PROBLEM_FIELDS) == list(PROBLEM_TYPES)
        for field, value in problem.items():
            assert isinstance(value, PROBLEM_TYPES[field]), (field, value)


@pytest.fixture
def args(tmp_path: Path) -> list[str]:
    (tmp_path / "root").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "cmdline").write_text(
        "microvm.share=onlytag microvm.volume=tmpfs:/x:tmpfs:nofail "
        "microvm.store-overlay=/nix/.ro-store:/nix/.rw-store"
    )
    return ["--root", str(tmp_path / "root"), "--config", str(tmp_path / "config.json"),
            "--cmdline", str(tmp_path / "cmdline")]  # fmt: skip


def run(*argv: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, list(argv))
    return result.exit_code, json.loads(result.stdout)


def test_mount_all_shape(args: list[str]) -> None:
    code, out = run("mount-all", *args, "--dry-run", "--json")
    assert (code, out["ok"]) == (1, False)
    assert list(MOUNT_TYPES) == list(MOUNT_FIELDS)
    check_shape(out, "mounts", MOUNT_TYPES)
    assert all(isinstance(o, str) for m in out["mounts"] for o in m["options"])


def test_status_shape(args: list[str]) -> None:
    code, out = run("status", *args, "--json")
    assert (code, out["ok"]) == (1, False)
    assert list(STATUS_TYPES) == list(STATUS_FIELDS)
    check_shape(out, "mounts", STATUS_TYPES, extra=("boot",))
    assert out["boot"] is None or isinstance(out["boot"], dict)
    (overlay,) = [m for m in out["mounts"] if m["layers"] is not None]
    assert list(overlay["layers"]) == list(LAYER_NAMES)
    for layer in overlay["layers"].values():
        assert list(layer) == list(LAYER_FIELDS)
    # not mounted: the configured layers, as the guest sees them, nothing the kernel shows
    assert overlay["layers"] == {
        name: {"path": path, "kernel_shows": None, "matches": None, "checked_by": None}
        for name, path in (
            ("lower", "/nix/.ro-store"),
            ("upper", "/nix/.rw-store/store"),
            ("work", "/nix/.rw-store/work"),
        )
    }


def test_discover_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    share = discover_cmd.ShareRow("virtio0", "ro-store", "9p", "pci")
    disk = discover_cmd.DiskRow("vda", "/dev/vda", "s", None, None, "ext4", 512, False, False)
    problem = Problem("/dev/vdb", "cannot read it to find its filesystem: x")
    monkeypatch.setattr(discover_cmd, "discover_all", lambda **_: ([share, disk], [], [problem]))
    code, out = run("discover", "--json")
    assert (code, out["ok"]) == (1, False)
    assert list(DEVICE_TYPES) == list(discover_cmd.DEVICE_FIELDS)
    check_shape(out, "devices", DEVICE_TYPES)
    # the same names as mount-all and status for the same things: source, fstype
    assert [(d["kind"], d["source"], d["fstype"]) for d in out["devices"]] == [
        ("share", "ro-store", "9p"),
        ("disk", "/dev/vda", "ext4"),
    ]


# --- status: the overlay's layers against what the kernel shows -----------------------

SPEC = OverlaySpec("src", "/lower", "/rw")


def _overlay(*options: str) -> Mount:
    return Mount(1, 0, (0, 99), "/", "/nix/store", ("rw",), "overlay", "overlay", options)


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for d in ("lower", "rw/store", "rw/work", "other"):
        (root / d).mkdir(parents=True)
    return root


FDS = ("lowerdir=/proc/self/fd/8", "upperdir=/proc/self/fd/9", "workdir=/proc/self/fd/10")


def test_layers_given_by_fd_on_one_filesystem_upper_checked_by_inode(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    # all layers on one filesystem: the overlay's root shows its upper directory's inode
    # (the upper dir itself stands in for the overlay's root)
    layers = overlay_layers(str(root), SPEC, str(root / "rw/store"), _overlay(*FDS))
    assert {k: tuple(v) for k, v in layers.items()} == {
        "lower": ("/lower", "/proc/self/fd/8", None, None),
        "upper": ("/rw/store", "/proc/self/fd/9", True, "inode"),
        "work": ("/rw/work", "/proc/self/fd/10", None, None),
    }
    other = overlay_layers(str(root), SPEC, str(root / "other"), _overlay(*FDS))
    assert (other["upper"].matches, other["upper"].checked_by) == (False, "inode")


def test_upper_on_another_filesystem_than_lower_is_checked_by_filesystem(tmp_path: Path) -> None:
    upper = tmp_path / "store"
    upper.mkdir()
    lower = os.stat("/proc")  # another filesystem than the upper's, whatever tmp_path is on
    got = status_overlay._upper_matches(str(upper), str(upper), upper.stat(), lower)
    assert got == (True, "filesystem")
    got = status_overlay._upper_matches("/proc", str(upper), upper.stat(), lower)
    assert got == (False, "filesystem")


def test_layers_given_as_paths_checked_by_device_and_inode(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    shown = (f"lowerdir={root}/other", f"upperdir={root}/rw/store", f"workdir={root}/rw/work")
    layers = overlay_layers(str(root), SPEC, str(root / "rw/store"), _overlay(*shown))
    assert [layers[k].matches for k in LAYER_NAMES] == [False, True, True]
    assert {layers[k].checked_by for k in LAYER_NAMES} == {"path"}


def test_status_text_names_the_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(tmp_path)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("microvm.store-overlay=/lower:/rw")
    rows, problems = status_cmd.mount_status(str(root), _config(cmdline))
    assert problems == []
    (row,) = rows
    assert row.lines()[1:] == [
        f"{'':<13}lower /lower",
        f"{'':<13}upper /rw/store",
        f"{'':<13}work  /rw/work",
    ]
    mounted = row._replace(layers=overlay_layers(
        str(root), SPEC, str(root / "rw/store"),
        _overlay(*FDS),
    ))  # fmt: skip
    assert mounted.lines()[1:] == [
        f"{'':<13}lower /lower (the kernel shows /proc/self/fd/8: not checkable)",
        f"{'':<13}upper /rw/store (the kernel shows /proc/self/fd/9: the same directory (by inode))",
        f"{'':<13}work  /rw/work (the kernel shows /proc/self/fd/10: not checkable)",
    ]


def _config(cmdline: Path) -> Any:
    from guest_agent.config.inputs import load, sources
    from guest_agent.report import Reporter

    return load(sources("/", os.devnull, str(cmdline)), Reporter(kmsg=None))

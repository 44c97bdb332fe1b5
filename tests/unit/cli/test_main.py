"""The entry point: plain `mount-all` runs without click; everything else goes to click."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from guest_agent.main import parse_mount_all


def test_plain_options_are_parsed_here(tmp_path: Path) -> None:
    assert parse_mount_all([]) == {}
    assert parse_mount_all(
        ["--root", str(tmp_path), "--config=/c.json", "--cmdline", "/x", "--dry-run", "--json"]
    ) == {"root": str(tmp_path), "config": "/c.json", "cmdline": "/x", "dry_run": True, "as_json": True}


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["-h"],
        ["--bogus"],
        ["extra"],
        ["--root"],  # missing value
        ["--config", "--json"],  # an option where a value belongs
        ["--root", "/nonexistent/dir"],  # click reports a bad --root (exit 2)
        ["--json=1"],
    ],
)
def test_anything_else_is_left_to_click(args: list[str]) -> None:
    assert parse_mount_all(args) is None


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "guest_agent", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _imported(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if "import time:" in line}


def test_boot_path_does_not_import_click(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("microvm.volume=tmpfs:/x:tmpfs\n")
    done = _run("mount-all", "--root", str(tmp_path), "--cmdline", str(cmdline), "--config", "/dev/null", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would-mount tmpfs tmpfs at /x" in done.stdout
    imported = _imported(done.stderr)
    assert "guest_agent.cli.mount_all" in imported
    assert not {m for m in imported if m == "click" or m.startswith("click.")}
    # Nor anything heavy that a bare interpreter does not import already (docs/design.md).
    bare = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True
    )
    extra = imported - _imported(bare.stderr)
    heavy = {"typing", "re", "enum", "json", "dataclasses", "inspect", "socket", "uuid", "shutil"}
    assert not extra & heavy, sorted(extra & heavy)


def test_usage_errors_still_come_from_click() -> None:
    done = _run("mount-all", "--bogus")
    assert done.returncode == 2
    assert "No such option '--bogus'" in done.stderr
    assert "click" in _imported(done.stderr)


def test_handlers_are_imported_only_for_the_kinds_met(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("microvm.volume=tmpfs:/x:tmpfs\n")
    done = _run("mount-all", "--root", str(tmp_path), "--cmdline", str(cmdline), "--config", "/dev/null", "--dry-run")
    assert done.returncode == 0, done.stderr
    imported = _imported(done.stderr)
    assert "guest_agent.handlers.pseudo" in imported
    others = {"share", "volume", "makefs", "overlay", "layers"}
    assert not {f"guest_agent.handlers.{kind}" for kind in others} & imported
    assert not {"guest_agent.reset", "guest_agent.devices.probe", "guest_agent.devices.blank"} & imported

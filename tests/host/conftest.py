"""Fixtures for host tests that mount for real: a temporary target root, loop devices, and
running the agent's CLI as a subprocess. Everything is unmounted and detached afterwards,
also when a test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def mountinfo_lines() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return f.read().splitlines()


def unescape(field: str) -> str:
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountLine:
    mount_id: int
    parent_id: int
    mount_point: str
    mount_options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]


def mounts() -> list[MountLine]:
    found = []
    for line in mountinfo_lines():
        left, _, right = line.partition(" - ")
        f, t = left.split(" "), right.split(" ")
        found.append(
            MountLine(int(f[0]), int(f[1]), unescape(f[4]), tuple(f[5].split(",")), t[0],
                      unescape(t[1]), tuple(t[2].split(",")))
        )  # fmt: skip
    return found


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def lines(self) -> list[str]:
        return self.stderr.splitlines()


@dataclass
class HostEnv:
    base: Path
    root: Path
    config: Path
    cmdline: Path
    loops: list[str] = field(default_factory=list)

    # -- the agent ---------------------------------------------------------------

    def agent(self, command: str, *extra: str, timeout: float = 60) -> Run:
        args = [sys.executable, "-m", "guest_agent", command]
        if command != "discover":
            args += ["--root", str(self.root), "--config", str(self.config),
                     "--cmdline", str(self.cmdline)]  # fmt: skip
        start = time.monotonic()
        done = subprocess.run(
            [*args, *extra], cwd=REPO, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        run = Run(done.returncode, done.stdout, done.stderr, time.monotonic() - start)
        assert "Traceback" not in run.stderr, run.stderr
        return run

    def start_agent(self, command: str, *extra: str) -> subprocess.Popen[str]:
        args = [sys.executable, "-m", "guest_agent", command, "--root", str(self.root),
                "--config", str(self.config), "--cmdline", str(self.cmdline), *extra]  # fmt: skip
        return subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip

    def mount_all(self, *extra: str, timeout: float = 60) -> Run:
        return self.agent("mount-all", *extra, timeout=timeout)

    def set_cmdline(self, *specs: str) -> None:
        self.cmdline.write_text("console=ttyS0 " + " ".join(specs) + " quiet\n")

    # -- the mount table under the root ------------------------------------------

    def all_mounts(self) -> list[MountLine]:
        return mounts()

    def under_root(self) -> list[MountLine]:
        root = str(self.root)
        return [
            m for m in mounts() if m.mount_point == root or m.mount_point.startswith(root + "/")
        ]

    def at(self, where: str) -> list[MountLine]:
        target = str(self.root) + where
        return [m for m in mounts() if m.mount_point == target]

    def one_at(self, where: str) -> MountLine:
        found = self.at(where)
        assert len(found) == 1, f"{where}: {found}"
        return found[0]

    def umount_all(self) -> None:
        """Unmount everything under the root, deepest first (like umount -R)."""
        for _ in range(3):
            lines = self.under_root()
            if not lines:
                return
            for line in sorted(lines, key=lambda m: -m.mount_point.count("/")):
                subprocess.run(["umount", line.mount_point], capture_output=True)
        for line in sorted(self.under_root(), key=lambda m: -m.mount_point.count("/")):
            subprocess.run(["umount", "-l", line.mount_point], capture_output=True)
        assert self.under_root() == []

    # -- loop devices --------------------------------------------------------------

    def image(self, name: str, size_mib: int = 32) -> Path:
        path = self.base / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        return path

    def attach(self, image: Path, *, read_only: bool = False) -> str:
        args = ["losetup", "-f", "--show", *(["-r"] if read_only else []), str(image)]
        dev = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
        self.loops.append(dev)
        udev_settle()
        return dev

    def ext4(self, *, label: str | None = None, files: dict[str, str] | None = None,
             size_mib: int = 32) -> tuple[str, Path]:  # fmt: skip
        image = self.image(f"ext4-{uuid.uuid4().hex[:8]}", size_mib)
        args = ["mkfs.ext4", "-q", "-F"]
        if label:
            args += ["-L", label]
        if files:
            src = self.populate(files)
            args += ["-d", str(src)]
        subprocess.run([*args, str(image)], check=True, capture_output=True)
        return self.attach(image), image

    def populate(self, files: dict[str, str]) -> Path:
        src = self.base / f"src-{uuid.uuid4().hex[:8]}"
        for rel, content in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(content)
        src.mkdir(exist_ok=True)
        return src

    def fs_uuid(self, dev: str) -> str:
        return subprocess.run(
            ["blkid", "-p", "-s", "UUID", "-o", "value", dev],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def detach_all(self) -> None:
        for dev in reversed(self.loops):
            for _ in range(20):
                if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        self.loops.clear()


def udev_settle() -> None:
    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "settle", "-t", "5"], capture_output=True)


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: real mounts (tmpfs, ext4, overlay) and loop devices")
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")


@pytest.fixture(autouse=True)
def _record_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's agents keep their boot record in the test's own directory, not in
    this machine's /run/guest-agent."""
    record = tmp_path / "run-guest-agent"
    monkeypatch.setenv("GUEST_AGENT_RECORD_DIR", str(record))
    return record


@pytest.fixture
def host(tmp_path: Path) -> Iterator[HostEnv]:
    _needs_root()
    base = Path(os.path.realpath(tmp_path))
    root = base / "root"
    root.mkdir()
    env = HostEnv(base, root, base / "mounts.json", base / "cmdline")
    env.config.write_text("{}")
    env.cmdline.write_text("")
    try:
        yield env
    finally:
        try:
            env.umount_all()
        finally:
            env.detach_all()

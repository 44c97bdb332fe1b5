"""resolve_in_root: chroot semantics, on real directories in a temporary dir.

The walk opens each component by fd (O_PATH, O_NOFOLLOW, readlinkat on the link
itself), which pyfakefs cannot fake; plain directories need no root or mount.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from guest_agent.kernel.paths import MAX_SYMLINKS, PathError, host_path, resolve_in_root


class RealFs:
    """The few pyfakefs calls these tests use, on the real filesystem."""

    def create_dir(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def create_file(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).write_text("data")

    def create_symlink(self, path: str, target: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)


@pytest.fixture
def fs() -> RealFs:
    return RealFs()


@pytest.fixture
def root(tmp_path: Path) -> str:
    (tmp_path / "etc").mkdir()  # outside the root: nothing may ever resolve there
    target = tmp_path / "target"
    target.mkdir()
    return str(target)


def test_host_path() -> None:
    assert host_path("/", "/srv") == "/srv"
    assert host_path("/target", "/srv") == "/target/srv"
    assert host_path("/target/", "/srv") == "/target/srv"


def test_plain_existing_path(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/srv/data")
    assert resolve_in_root(root, "/srv/data") == "/srv/data"
    assert resolve_in_root(root, "//srv/./data/") == "/srv/data"


def test_the_root_itself(root: str) -> None:
    assert resolve_in_root(root, "/") == "/"
    assert resolve_in_root(root, "") == "/"


def test_missing_without_create(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/srv")
    with pytest.raises(PathError, match=r"^/srv/data does not exist$"):
        resolve_in_root(root, "/srv/data/x")


def test_create_makes_missing_dirs(root: str) -> None:
    assert resolve_in_root(root, "/a/b/c", create=True) == "/a/b/c"
    assert os.path.isdir(f"{root}/a/b/c")
    assert (os.stat(f"{root}/a/b").st_mode & 0o777) == 0o755


def test_absolute_symlink_restarts_at_the_root(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/real/data")
    fs.create_symlink(f"{root}/link", "/real")
    assert resolve_in_root(root, "/link/data") == "/real/data"


def test_absolute_symlink_to_slash_stays_in_the_root(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/share")
    fs.create_symlink(f"{root}/share/evil", "/")
    assert resolve_in_root(root, "/share/evil") == "/"
    assert resolve_in_root(root, "/share/evil/etc", create=True) == "/etc"
    assert os.path.isdir(f"{root}/etc")
    assert os.listdir(f"{root}/../etc") == []  # the host's /etc was not touched


def test_symlink_to_host_path_is_taken_inside_the_root(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/share")
    fs.create_symlink(f"{root}/share/evil", "/etc")
    with pytest.raises(PathError, match=r"^/etc does not exist$"):
        resolve_in_root(root, "/share/evil")
    assert resolve_in_root(root, "/share/evil/x", create=True) == "/etc/x"
    assert os.path.isdir(f"{root}/etc/x")
    assert not os.path.exists(f"{root}/../etc/x")


@pytest.mark.parametrize("target", ["../../..", "../../../../../..", "../../../mnt/.."])
def test_relative_dotdot_never_climbs_above_the_root(root: str, fs: Any, target: str) -> None:
    fs.create_dir(f"{root}/mnt/share")
    fs.create_symlink(f"{root}/mnt/share/up", target)
    assert resolve_in_root(root, "/mnt/share/up") == "/"
    assert resolve_in_root(root, "/mnt/share/up/x", create=True) == "/x"
    assert os.path.isdir(f"{root}/x")
    assert not os.path.exists("/x")


def test_relative_symlink_is_relative_to_its_directory(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/a/b")
    fs.create_dir(f"{root}/a/c")
    fs.create_symlink(f"{root}/a/b/l", "../c")
    assert resolve_in_root(root, "/a/b/l") == "/a/c"


def test_chained_symlinks(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/final")
    fs.create_symlink(f"{root}/one", "two")
    fs.create_symlink(f"{root}/two", "/three/")
    fs.create_symlink(f"{root}/three", "./final")
    assert resolve_in_root(root, "/one") == "/final"


def test_dotdot_in_the_path_after_a_symlink_uses_the_target(root: str, fs: Any) -> None:
    # like the kernel: /l/.. is the parent of l's target, not the directory holding l
    fs.create_dir(f"{root}/x/y")
    fs.create_dir(f"{root}/z")
    fs.create_symlink(f"{root}/z/l", "/x/y")
    assert resolve_in_root(root, "/z/l/..") == "/x"


def test_dangling_symlink_is_created_inside_the_root(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/share")
    fs.create_symlink(f"{root}/share/mnt", "/somewhere/new")
    assert resolve_in_root(root, "/share/mnt", create=True) == "/somewhere/new"
    assert os.path.isdir(f"{root}/somewhere/new")
    assert not os.path.exists("/somewhere")


def test_file_in_the_way(root: str, fs: Any) -> None:
    fs.create_file(f"{root}/srv/file")
    with pytest.raises(PathError, match=r"^/srv/file is not a directory$"):
        resolve_in_root(root, "/srv/file/x", create=True)
    with pytest.raises(PathError, match=r"^/srv/file is not a directory$"):
        resolve_in_root(root, "/srv/file")


def test_symlink_to_a_file_is_not_a_directory(root: str, fs: Any) -> None:
    fs.create_file(f"{root}/data/f")
    fs.create_symlink(f"{root}/l", "/data/f")
    with pytest.raises(PathError, match=r"^/data/f is not a directory$"):
        resolve_in_root(root, "/l")


def test_symlink_loop(root: str, fs: Any) -> None:
    fs.create_symlink(f"{root}/a", "b")
    fs.create_symlink(f"{root}/b", "/a")
    with pytest.raises(PathError, match=r"^too many levels of symbolic links at /[ab]$"):
        resolve_in_root(root, "/a/x", create=True)


def test_self_loop(root: str, fs: Any) -> None:
    fs.create_symlink(f"{root}/self", "self")
    with pytest.raises(PathError, match="too many levels of symbolic links at /self"):
        resolve_in_root(root, "/self")


def test_long_chain_within_the_limit(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/end")
    for i in range(MAX_SYMLINKS):
        fs.create_symlink(f"{root}/l{i}", f"l{i + 1}" if i + 1 < MAX_SYMLINKS else "end")
    assert resolve_in_root(root, "/l0") == "/end"
    fs.create_symlink(f"{root}/pre", "l0")
    with pytest.raises(PathError, match="too many levels"):
        resolve_in_root(root, "/pre")


def test_cannot_create() -> None:
    base = tempfile.mkdtemp(dir="/tmp")  # traversable by an unprivileged user
    try:
        os.chmod(base, 0o755)
        os.mkdir(f"{base}/ro", 0o555)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child drops root, so that the mode bits apply
            try:
                os.setuid(1000)
                resolve_in_root(base, "/ro/x", create=True)
                os.write(write, b"created")
            except PathError as e:
                os.write(write, str(e).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        said = os.read(read, 4096).decode()
        os.close(read)
        assert said == "cannot create /ro/x: Permission denied"
    finally:
        os.chmod(f"{base}/ro", 0o755)
        import shutil

        shutil.rmtree(base)


def test_root_slash(tmp_path: Path) -> None:
    real = os.path.realpath(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "l").symlink_to("data")
    (tmp_path / "up").symlink_to("../" * (real.count("/") + 3))
    assert resolve_in_root("/", f"{real}/l") == f"{real}/data"
    assert resolve_in_root("/", f"{real}/up") == "/"


def test_resolve_as_far_as_exists(root: str, fs: Any) -> None:
    from guest_agent.kernel.paths import open_root, resolve_as_far_as_exists

    fs.create_dir(f"{root}/var/home")
    fs.create_symlink(f"{root}/home", "var/home")
    root_fd = open_root(root)
    try:
        assert resolve_as_far_as_exists(root_fd, "/home/alice/x") == "/var/home/alice/x"
        assert resolve_as_far_as_exists(root_fd, "/home") == "/var/home"
        assert resolve_as_far_as_exists(root_fd, "/new/../home/a") == "/home/a"
        assert resolve_as_far_as_exists(root_fd, "/") == "/"
    finally:
        os.close(root_fd)
    assert not os.path.exists(f"{root}/var/home/alice")  # nothing was made

"""resolve_in_root: chroot semantics on a fake filesystem (pyfakefs)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pyfakefs.helpers import reset_ids, set_uid

from guest_agent.paths import MAX_SYMLINKS, PathError, host_path, resolve_in_root

ROOT = "/target"


@pytest.fixture
def root(fs: Any) -> str:
    fs.create_dir(ROOT)
    fs.create_dir("/etc")  # outside the root: nothing may ever resolve there
    return ROOT


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
    assert os.listdir("/etc") == []  # the host's /etc was not touched


def test_symlink_to_host_path_is_taken_inside_the_root(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/share")
    fs.create_symlink(f"{root}/share/evil", "/etc")
    with pytest.raises(PathError, match=r"^/etc does not exist$"):
        resolve_in_root(root, "/share/evil")
    assert resolve_in_root(root, "/share/evil/x", create=True) == "/etc/x"
    assert os.path.isdir(f"{root}/etc/x")
    assert not os.path.exists("/etc/x")


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


def test_cannot_create(root: str, fs: Any) -> None:
    fs.create_dir(f"{root}/ro")
    os.chmod(f"{root}/ro", 0o555)
    set_uid(1000)
    try:
        with pytest.raises(PathError, match=r"^cannot create /ro/x: Permission denied$"):
            resolve_in_root(root, "/ro/x", create=True)
    finally:
        reset_ids()


def test_root_slash(fs: Any) -> None:
    fs.create_dir("/srv/data")
    fs.create_symlink("/srv/l", "../../srv/data")
    assert resolve_in_root("/", "/srv/l") == "/srv/data"

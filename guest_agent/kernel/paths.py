"""Reaching paths under --root through directory fds, so that nothing leads outside it.

Everything on a volume or share is a stranger's data: a symlink there may point
anywhere, and may be swapped in between two looks. So a path is never resolved
to a string first and used later. Instead each component is opened with
O_NOFOLLOW relative to the fd of its parent; a symlink met on the way is read
from its own fd and followed as if the root were `/` (an absolute target
restarts at the root, `..` never climbs above it); missing directories are made
with mkdirat in the parent the walk holds open. The result is an fd of the
directory itself, which mounts, renames and deletions then use.
"""

from __future__ import annotations

import os
import posixpath
import stat

from guest_agent.kernel.syscalls import closing

MAX_SYMLINKS = 40
DIR_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
# An owned directory: never a symlink (ELOOP), never a FIFO or file (ENOTDIR), never blocking.
OWNED_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class PathError(Exception):
    """A path that cannot be used as asked; the message names the in-root path."""


class Missing(PathError):
    """A component of the path does not exist (and was not to be made).

    `resolved` is the in-root path of the deepest directory found, `rest` the
    components still to walk from there (the missing one first)."""

    resolved = "/"
    rest: tuple[str, ...] = ()


def host_path(root: str, in_root: str) -> str:
    """Join an already resolved in-root path onto the root, without resolving anything."""
    return in_root if root == "/" else root.rstrip("/") + in_root


class Opened:
    """A directory opened inside the root: its fd (O_PATH) and the in-root path it was
    reached by. Close it (or use it as a context manager)."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def __enter__(self) -> Opened:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_root(root: str) -> int:
    return os.open(root, DIR_PATH_FLAGS)


def walk(root_fd: int, path: str, *, create: bool = False) -> Opened:
    """Open the directory PATH names inside the root ROOT_FD (chroot semantics).

    With CREATE, missing directories are made (mode 0755), like `mkdir -p`.
    Raises PathError when a component is not a directory, a symlink loop is
    found, or a directory cannot be made or opened.
    """
    pending = [p for p in path.split("/") if p not in ("", ".")]
    pending.reverse()  # a stack: the next component last
    fds: list[int] = []  # open directories below the root, one per name
    names: list[str] = []
    followed = 0
    try:
        while pending:
            name = pending.pop()
            if name == ".":
                continue
            if name == "..":
                if names:
                    names.pop()
                    os.close(fds.pop())
                continue
            parent = fds[-1] if fds else root_fd
            in_root = "/" + "/".join([*names, name])
            try:
                fd = _open_component(parent, name, in_root, create)
            except Missing as e:
                e.resolved, e.rest = "/" + "/".join(names), (name, *reversed(pending))
                raise
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                fds.append(fd)
                names.append(name)
                continue
            with closing(fd):
                if not stat.S_ISLNK(mode):
                    raise PathError(f"{in_root} is not a directory")
                followed += 1
                if followed > MAX_SYMLINKS:
                    raise PathError(f"too many levels of symbolic links at {in_root}")
                target = os.readlink("", dir_fd=fd)  # the link we opened, not its name
            if target.startswith("/"):
                while fds:
                    os.close(fds.pop())
                names.clear()
            pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
        result = fds.pop() if fds else os.dup(root_fd)
        return Opened(result, "/" + "/".join(names))
    except OSError as e:
        raise PathError(f"cannot open {path}: {e.strerror}") from None
    finally:
        for fd in fds:
            os.close(fd)


def _open_component(parent: int, name: str, in_root: str, create: bool) -> int:
    """An O_PATH fd of NAME in PARENT itself (a symlink is opened, not followed)."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise Missing(f"{in_root} does not exist") from None
    try:
        os.mkdir(name, 0o755, dir_fd=parent)
    except FileExistsError:
        pass  # made meanwhile; whatever it is now is looked at like any other
    except OSError as e:
        raise PathError(f"cannot create {in_root}: {e.strerror}") from None
    try:
        return os.open(name, flags, dir_fd=parent)
    except OSError as e:
        raise PathError(f"cannot open {in_root}: {e.strerror}") from None


def resolve_in_root(root: str, path: str, *, create: bool = False) -> str:
    """The in-root path PATH really names (see `walk`)."""
    with closing(open_root(root)) as root_fd, walk(root_fd, path, create=create) as opened:
        return opened.path


def resolve_as_far_as_exists(root_fd: int, path: str) -> str:
    """Where PATH would land inside the root: its existing part resolved (links followed,
    chroot semantics), the missing rest taken as written. PathError as `walk`."""
    try:
        with walk(root_fd, path) as opened:
            return opened.path
    except Missing as e:
        return posixpath.normpath(posixpath.join(e.resolved, *e.rest))


def reopen(fd: int, flags: int = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) -> int:
    """A readable fd of the directory FD names (O_PATH fds cannot be listed or synced)."""
    return os.open(".", flags, dir_fd=fd)


def kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device node"


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def ancestors(fd: int, limit: int = 256) -> list[tuple[int, int]]:
    """(dev, ino) of the directory FD and of each directory above it, up to `/`,
    as the kernel walks `..` (across mounts, never above this process's root)."""
    seen = [identity(fd)]
    current = os.dup(fd)
    try:
        for _ in range(limit):
            parent = os.open("..", DIR_PATH_FLAGS, dir_fd=current)
            os.close(current)
            current = parent
            ident = identity(current)
            if ident == seen[-1]:
                break
            seen.append(ident)
    finally:
        os.close(current)
    return seen


def overlapping(a: int, b: int) -> bool:
    """Whether directories A and B are the same or one lies beneath the other."""
    return identity(a) in ancestors(b) or identity(b) in ancestors(a)


def landing(root: str, where: str) -> str | None:
    """The host path where WHERE lands (as far as it exists: a mount point may be hidden
    under a later mount, where its directory is not to be seen)."""
    try:
        root_fd = open_root(root)
    except OSError:
        return None
    try:
        return host_path(root, resolve_as_far_as_exists(root_fd, where))
    except PathError:
        return None
    finally:
        os.close(root_fd)

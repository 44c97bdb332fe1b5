"""Resolving in-root paths with chroot semantics, so that no mount lands outside --root.

A symlink met on the way (for instance inside a share mounted a moment ago)
is followed as if the root were `/`: an absolute target restarts at the root
and `..` never climbs above it.
"""

from __future__ import annotations

import os
import stat

MAX_SYMLINKS = 40


class PathError(Exception):
    """A path that cannot be used as asked; the message names the in-root path."""


def host_path(root: str, in_root: str) -> str:
    """Join an already resolved in-root path onto the root, without resolving anything."""
    return in_root if root == "/" else root.rstrip("/") + in_root


def resolve_in_root(root: str, path: str, *, create: bool = False) -> str:
    """Return the in-root path PATH really names, following symlinks inside ROOT.

    With CREATE, missing directories are made (mode 0755), like `mkdir -p`.
    Raises PathError when a component is not a directory, a symlink loop is
    found, or a directory cannot be made.
    """
    pending = [p for p in path.split("/") if p]
    resolved: list[str] = []
    followed = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        in_root = "/" + "/".join([*resolved, name])
        candidate = host_path(root, in_root)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            if not create:
                raise PathError(f"{in_root} does not exist") from None
            try:
                os.mkdir(candidate, 0o755)
            except OSError as e:
                raise PathError(f"cannot create {in_root}: {e.strerror}") from None
            resolved.append(name)
            continue
        except OSError as e:
            raise PathError(f"cannot look at {in_root}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            followed += 1
            if followed > MAX_SYMLINKS:
                raise PathError(f"too many levels of symbolic links at {in_root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise PathError(f"{in_root} is not a directory")
        resolved.append(name)
    return "/" + "/".join(resolved)

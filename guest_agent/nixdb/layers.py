"""x-nix-db's view of the overlay's layers: the fds the agent holds (`Layers`, shared by
every step) and the registration, read from the lower layer itself with no link followed.

The lowest of the family but nixfiles: it imports nothing of it but nixfiles (and
nixreg, only when a registration is read, which an unchanged boot never does).
"""

from __future__ import annotations

import os

from guest_agent.nixdb import files as nixfiles
from guest_agent.nixdb.files import STORE_DIR, RegistrationError, store_name

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from guest_agent.nixdb.registration import Registration

MAX_REGISTRATION = 256 << 20
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Layers:
    """The overlay's layers as the agent holds them: fds of LOWER, RW and RW/store."""

    def __init__(self, lower: int, rw: int, upper: int) -> None:
        self.lower = lower
        self.rw = rw
        self.upper = upper


def open_registration(lower: int, reg_info: str) -> tuple[int, str]:
    """An fd of the registration file REG_INFO (/nix/store/NAME/…), read from the lower
    layer itself, and NAME (its store path, not part of its own registration). Every
    component is opened with O_NOFOLLOW relative to the last: no link is followed."""
    name, _, rest = reg_info.removeprefix(STORE_DIR + "/").partition("/")
    store_name(f"{STORE_DIR}/{name}")
    parts = rest.split("/")
    if not reg_info.startswith(STORE_DIR + "/") or not rest or {"", ".", ".."} & set(parts):
        raise RegistrationError(f"{reg_info} names no file inside a store path")
    walk = os.open(name, _DIR_FLAGS, dir_fd=lower)
    try:
        for part in parts[:-1]:
            step = os.open(part, _DIR_FLAGS, dir_fd=walk)
            os.close(walk)
            walk = step
        fd = nixfiles.open_owned(walk, parts[-1], MAX_REGISTRATION, links_ok=True)
    except nixfiles.Unusable as e:
        raise RegistrationError(str(e)) from None
    finally:
        os.close(walk)
    if fd is None:
        raise RegistrationError(f"{reg_info} does not exist")
    return fd, name


def read_registration(fd: int) -> Registration:
    """The registration, every entry checked in full (before anything acts on any of them)."""
    data = nixfiles.read_fd(fd, MAX_REGISTRATION + 1)
    if len(data) > MAX_REGISTRATION:
        raise RegistrationError(f"larger than {MAX_REGISTRATION >> 20} MiB")
    from guest_agent.nixdb.registration import Registration

    registration = Registration(data)
    registration.check()
    return registration

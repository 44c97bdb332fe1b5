"""What every handler works with: the `Context` of a run, and the `Handler` interface.

The context holds the target root (paths resolved inside it by fd), the mount
table, the devices, the mount log and the mount function (injected: tests
record the mounts instead of making them, as kmod's tests inject its syscalls).
"""

from __future__ import annotations

import errno
import os

from guest_agent.kernel.mount import MountError, MountRequest
from guest_agent.kernel.mount import mount as kernel_mount
from guest_agent.kernel.mountinfo import MOUNTINFO, MountTable
from guest_agent.kernel.paths import PathError, host_path, open_root, resolve_in_root, walk
from guest_agent.kernel.syscalls import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, closing, openat2
from guest_agent.results import Failure, Result, Status, refused

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol, TypeVar

    from guest_agent.devices.discovery import Devices
    from guest_agent.kernel.mountinfo import Mount
    from guest_agent.kernel.paths import Opened
    from guest_agent.report import Reporter
    from guest_agent.results import MountLog
    from guest_agent.spec import MountSpec, Options, PseudoSpec, VolumeSpec

    # A handler is one spec's mount, made by `handler_for`: the spec is bound in,
    # so no method takes a spec and none narrows one (see handlers/__init__.py).
    # Covariant: S is only read, so a ShareHandler (a Handler[ShareSpec]) is a
    # Handler[MountSpec].
    S_co = TypeVar("S_co", bound=MountSpec, covariant=True)

    class Handler(Protocol[S_co]):
        @property
        def spec(self) -> S_co:
            """The spec this handler mounts."""

        def present(self, ctx: Context) -> bool:
            """Whether the spec's tag or disk can be used right now (no waiting)."""

        def dry_run(self, ctx: Context, store_lower: bool = False) -> Result:
            """What mounting the spec would do (nothing is made or mounted); STORE_LOWER:
            it is the store overlay's lower layer (read-only by default)."""

        def mount(self, ctx: Context, store_lower: bool = False) -> Result:
            """Mount the spec (waiting for its device); raises Failure."""

        def matches(self, current: Mount, devices: Devices) -> bool:
            """Whether CURRENT, mounted at the spec's WHERE, is what the spec asks for."""


class Context:
    """One run on one target root."""

    def __init__(
        self,
        root: str,  # real host path of the target root
        reporter: Reporter,
        devices: Devices,
        log: MountLog,
        *,
        dry_run: bool = False,
        reset_requested: bool = False,
        mountinfo: str = MOUNTINFO,
        mount: Callable[[MountRequest], None] | None = None,
    ) -> None:
        self.root = root
        self.reporter = reporter
        self.devices = devices
        self.log = log
        self.dry_run = dry_run
        self.reset_requested = reset_requested
        self.mountinfo = mountinfo
        self._mount = kernel_mount if mount is None else mount
        self._root_fd: int | None = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def root_fd(self) -> int:
        if self._root_fd is None:
            self._root_fd = open_root(self.root)
        return self._root_fd

    def table(self) -> MountTable:
        return MountTable.read(self.mountinfo)

    def existing(self, host: str) -> Mount | None:
        """What is mounted at HOST and visible there (a hidden mount is no mount)."""
        return self.table().visible_at(host)

    def target(self, where: str, *, create: bool = True) -> str:
        """Resolve WHERE inside the root (making missing dirs); return the host path."""
        if self.dry_run:
            create = False
        try:
            resolved = resolve_in_root(self.root, where, create=create)
        except PathError:
            if self.dry_run:
                return host_path(self.root, where)
            raise
        if resolved == "/":
            raise Failure(f"{where} resolves to the root itself")
        return host_path(self.root, resolved)

    def open_dir(self, where: str, *, create: bool = False) -> Opened:
        """The directory WHERE names inside the root, opened (see paths.walk)."""
        return walk(self.root_fd(), where, create=create)

    def do_mount(self, request: MountRequest) -> None:
        """Mount onto an fd the kernel resolved inside the root, so no symlink swapped in
        since our own resolution can send the mount outside it."""
        in_root = request.target.removeprefix(self.root.rstrip("/")) or "/"
        try:
            fd = open_in_root(self.root, in_root)
        except OSError as e:
            raise Failure(f"cannot open the mount point {in_root}: {e.strerror}") from None
        try:
            self._mount(request._replace(target_fd=fd))
        finally:
            if fd is not None:
                os.close(fd)
        self.log.mounted(request.target)

    def already(self, where: str, source: str, current: Mount) -> Result:
        self.reporter.info(f"{where}: already mounted ({current.fstype} {current.source})")
        return Result(
            where,
            source,
            Status.ALREADY_MOUNTED,
            current.fstype,
            current.source,
            current.super_options,
        )

    def mounted(
        self,
        spec: MountSpec,
        fstype: str,
        source: str,
        label: str,
        options: tuple[str, ...],
    ) -> Result:
        """Report and record a mount made (LABEL names its source in the line)."""
        shown = ", ".join(o for o in options if o.split("=")[0] in ("msize", "cache", "ro", "rw"))
        if "ro" not in options and "rw" not in options:
            shown = f"{shown}, rw" if shown else "rw"
        self.reporter.info(f"mounted {fstype} {label} at {spec.where} ({shown})")
        return Result(spec.where, spec.source, Status.MOUNTED, fstype, source, options)


def open_in_root(root: str, path: str) -> int | None:
    """An O_PATH fd of the directory PATH, resolved by the kernel as if ROOT were `/`.

    openat2(RESOLVE_IN_ROOT) (Linux >= 5.6) makes the lookup and the mount one
    atomic choice: a symlink swapped in after our own resolution still cannot
    lead outside ROOT. None when the kernel lacks openat2. Raises OSError.
    """
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    with closing(os.open(root, flags)) as root_fd:
        try:
            return openat2(root_fd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            if e.errno == errno.ENOSYS:
                return None
            raise


def read_only_default(implied: bool, options: Options) -> tuple[str, ...]:
    """The kernel options: `ro` first when IMPLIED and the user said neither ro nor rw."""
    if implied and options.read_only is None:
        return ("ro", *options.kernel)
    return options.kernel


def mount_device(
    ctx: Context,
    spec: VolumeSpec | PseudoSpec,
    fstype: str,
    source: str,
    host: str,
    options: tuple[str, ...],
) -> Result:
    """Mount SOURCE (a device, or tmpfs's free text); a refusal carries a hint when the
    kernel's errno tells a read-only device or a damaged filesystem."""
    try:
        ctx.do_mount(MountRequest(fstype, source, host, options))
    except MountError as e:
        failure = refused(fstype, e)
        if e.errno == errno.EACCES or (e.errno == errno.EROFS and "ro" not in options):
            failure.hint = "the device is read-only: add ro to the options to mount it read-only"
        elif e.errno in (errno.EBADMSG, errno.EUCLEAN):  # EFSBADCRC, EFSCORRUPTED
            failure.hint = (
                f"the {fstype} filesystem on {source} is damaged (dmesg says where); "
                f"repair it with fsck.{fstype}: it is never formatted"
            )
        raise failure from None
    label = source if source == spec.what else f"{source} ({spec.what})"
    return ctx.mounted(spec, fstype, source, label, options)

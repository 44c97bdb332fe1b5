"""Execution: the only layer that touches the kernel (modules, devices, mounts).

Steps run in plan order. A step that fails raises `Failure` internally; it is
turned into a `Problem` for that spec and the other steps go on (a step whose
parent is not mounted is skipped, never mounted onto the wrong filesystem).
"""

from __future__ import annotations

import errno
import os
import time
from functools import partial

from guest_agent import reset as overlay_reset
from guest_agent.mountinfo import Mount, MountTable
from guest_agent.paths import (
    Opened,
    PathError,
    host_path,
    identity,
    open_root,
    overlapping,
    reopen,
    resolve_as_far_as_exists,
    resolve_in_root,
    walk,
)
from guest_agent.plan import Step, order_by_resolved, upper_on_9p
from guest_agent.records import NamedTuple
from guest_agent.spec import (
    MountSpec,
    Options,
    OverlaySpec,
    Problem,
    Proto,
    ShareSpec,
    VolumeSpec,
)
from guest_agent.syscalls import MountError, MountRequest, mount, open_in_root, umount

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from guest_agent.kmod import ModuleLoader
    from guest_agent.probe import Signature
    from guest_agent.report import Reporter
    from guest_agent.sysfs import BlockDevice
    from guest_agent.uevent import UeventMonitor

# 9p: the virtio transport carries at most PAGE_SIZE * (VIRTQUEUE_NUM - 3) = 512000 bytes a
# message on 4 KiB pages; a larger msize is clamped by the kernel (see docs/defaults.md).
NINEP_MSIZE = "512000"
READ_ONLY_FILESYSTEMS = frozenset({"erofs", "squashfs", "iso9660"})
OVERLAY_SAFE_DEFAULTS = ("index", "metacopy", "redirect_dir", "xino")
SHARE_FSTYPES = ("9p", "virtiofs")


class Failure(Exception):
    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


class Result(NamedTuple):
    where: str
    spec: str
    status: str  # mounted | already-mounted | would-mount | failed | skipped
    fstype: str | None = None
    source: str | None = None
    options: tuple[str, ...] = ()
    message: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "spec": self.spec,
            "status": self.status,
            "fstype": self.fstype,
            "source": self.source,
            "options": list(self.options),
            "message": self.message,
        }


# --- pure option builders ------------------------------------------------------


def share_options(proto: str, options: Options, read_only: bool) -> tuple[str, ...]:
    """Kernel options for a share: the agent's defaults, then the user's (which win)."""
    chosen: list[str] = []
    if proto == Proto.NINEP:
        # An immutable store can be cached aggressively; a read-write share must stay
        # coherent with the host: mmap caches only what is mmap'ed.
        defaults = {
            "trans": "virtio",
            "version": "9p2000.L",
            "msize": NINEP_MSIZE,
            "cache": "loose" if read_only else "mmap",
        }
        chosen += [f"{k}={v}" for k, v in defaults.items() if not options.has(k)]
    if read_only and options.read_only is None:
        chosen.append("ro")
    return (*chosen, *options.kernel)


def volume_options(fstype: str, options: Options, store_lower: bool) -> tuple[str, ...]:
    implied_ro = fstype in READ_ONLY_FILESYSTEMS or store_lower
    if implied_ro and options.read_only is None:
        return ("ro", *options.kernel)
    return options.kernel


def _escape_layer(path: str) -> str:
    # overlayfs splits lowerdir on ':' and the option string on ','; escape both.
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def overlay_options(
    lower: str, upper: str, work: str, options: Options, userxattr: bool
) -> tuple[str, ...]:
    chosen = [
        f"lowerdir={_escape_layer(lower)}",
        f"upperdir={_escape_layer(upper)}",
        f"workdir={_escape_layer(work)}",
    ]
    if userxattr and not options.has("userxattr"):
        chosen.append("userxattr")
    use_xattr = userxattr or options.has("userxattr")
    for feature in OVERLAY_SAFE_DEFAULTS:
        if options.has(feature):
            continue
        if use_xattr and feature in ("redirect_dir", "metacopy"):
            continue  # userxattr turns these off itself, and refuses them given explicitly
        chosen.append(f"{feature}=off")
    return (*chosen, *options.kernel)


# --- the executor ----------------------------------------------------------------


class Executor:
    def __init__(
        self,
        root: str,  # real host path of the target root
        reporter: Reporter,
        *,
        sysfs: str = "/sys",
        dry_run: bool = False,
        reset_requested: bool = False,
        mountinfo: str = "/proc/self/mountinfo",
    ) -> None:
        self.root = root
        self.reporter = reporter
        self.sysfs = sysfs
        self.dry_run = dry_run
        self.reset_requested = reset_requested
        self.mountinfo = mountinfo
        self.start = time.monotonic()  # device deadlines count from here
        self.results: list[Result] = []
        self.mounted: set[str] = set()  # WHEREs mounted, now or before
        self.mounted_here: list[str] = []  # host paths this run mounted
        self._modules: ModuleLoader | None = None
        self._monitor: UeventMonitor | None = None
        self._coldplugged = False
        # What discovery saw (sysfs scans, superblocks), reused until something may have
        # changed: a uevent, a wait, a module load, a format. Keeps each look cheap.
        self._seen: dict[str, Any] = {}
        self._root_fd: int | None = None
        self._placed: list[tuple[MountSpec, str]] = []  # what this run mounted, and where

    # -- driving ------------------------------------------------------------------

    def run(self, steps: list[Step]) -> list[Result]:
        """Mount what is there first, then wait for the rest (in plan order both times).

        A step whose tag or disk has not appeared yet is put off, with every step
        below it, so that one slow or missing device does not hold up the others.
        """
        steps = self._by_resolved_target(steps)
        later: list[Step] = []
        put_off: set[str] = set()
        for step in steps:
            if any(d in put_off for d in step.after) or not self._present(step):
                later.append(step)
                put_off.add(step.where)
            else:
                self.run_step(step)
        for step in later:
            self.run_step(step)
        self._check_hidden()
        return self.results

    def _by_resolved_target(self, steps: list[Step]) -> list[Step]:
        """Order mounts by where their mount points resolve inside the root now (a symlink
        such as /home -> var/home puts /home/alice beneath /var/home), not as written."""
        if self._root_fd is None:
            self._root_fd = open_root(self.root)
        resolved = {}
        for step in steps:
            try:
                resolved[step.where] = resolve_as_far_as_exists(self._root_fd, step.where)
            except PathError:
                continue  # its own step reports the problem
        if all(resolved.get(s.where, s.where) == s.where for s in steps):
            return steps
        return order_by_resolved(steps, resolved)

    def _check_hidden(self) -> None:
        """Each mount this run made must still be visible: one a later mount covers (over
        its mount point or an ancestor) is reported, as a failure of its spec."""
        if not self._placed:
            return
        table = self.table()
        for spec, host in self._placed:
            mine = table.at(host)
            cover = table.hidden_by(mine) if mine is not None else None
            if cover is None:
                continue
            reason = (
                f"mounted at {spec.where}, but hidden by {cover.fstype} {cover.source}"
                f" mounted at {cover.mount_point} after it"
            )
            self.results.append(Result(spec.where, spec.source, "failed", message=reason))
            self.reporter.problem(
                Problem(
                    spec.source,
                    reason,
                    "check the symbolic links on the way to it",
                    fatal=not spec.options.nofail,
                )
            )

    def _present(self, step: Step) -> bool:
        """Whether STEP's tag or disk can be used right now (no waiting)."""
        spec = step.spec
        if self.dry_run or isinstance(spec, OverlaySpec):
            return True
        if isinstance(spec, VolumeSpec) and spec.by[0] == "pseudo":
            return True
        self.coldplug()
        try:
            if isinstance(spec, ShareSpec):
                return self._locate_share(spec)[0] is not None
            return self._find_disk(spec) is not None
        except Failure:
            return True  # run it now: its own step reports the problem

    def run_step(self, step: Step) -> None:
        spec = step.spec
        nofail = spec.options.nofail
        missing = [d for d in step.after if d not in self.mounted]
        if missing:
            reason = f"not mounted: it needs {missing[0]} mounted first, which is not"
            self.results.append(Result(spec.where, spec.source, "skipped", message=reason))
            self.reporter.problem(Problem(spec.source, reason, fatal=not nofail))
            return
        try:
            if isinstance(spec, ShareSpec):
                result = self._share(spec, step.store_lower)
            elif isinstance(spec, VolumeSpec):
                result = self._volume(spec, step.store_lower)
            else:
                result = self._overlay(spec)
        except (Failure, PathError, OSError) as e:
            hint = e.hint if isinstance(e, Failure) else None
            if isinstance(e, Failure):
                reason = e.reason
            elif isinstance(e, OSError):  # an I/O error we did not foresee: still one line
                reason = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
            else:
                reason = str(e)
            self.results.append(Result(spec.where, spec.source, "failed", message=reason))
            self.reporter.problem(Problem(spec.source, reason, hint, fatal=not nofail))
            return
        self.results.append(result)
        if result.status in ("mounted", "already-mounted", "would-mount"):
            self.mounted.add(spec.where)
        if result.status == "mounted" and self.mounted_here:
            self._placed.append((spec, self.mounted_here[-1]))

    def close(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    # -- shared helpers -------------------------------------------------------------

    def table(self) -> MountTable:
        return MountTable.read(self.mountinfo)

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
        if self._root_fd is None:
            self._root_fd = open_root(self.root)
        return walk(self._root_fd, where, create=create)

    def modules(self) -> ModuleLoader:
        if self._modules is None:
            from guest_agent.kmod import ModuleLoader

            self._modules = ModuleLoader(sysfs=self.sysfs)
        return self._modules

    def need_filesystem(self, fstype: str) -> None:
        if fstype in self._seen.get("filesystems", ()):
            return
        error = self.modules().ensure_filesystem(fstype)
        self.forget()  # a module load can add devices (and virtiofs tags)
        self._seen.setdefault("filesystems", set()).add(fstype)
        if error:
            raise Failure(f"the kernel does not support {fstype}: {error}")

    def seen(self, key: str, look: Callable[[], Any]) -> Any:
        if key not in self._seen:
            self._seen[key] = look()
        return self._seen[key]

    def forget(self) -> None:
        self._seen.clear()

    def coldplug(self) -> None:
        """Once: watch uevents (before looking, so none is missed), then load virtio drivers."""
        if self._coldplugged:
            return
        self._coldplugged = True
        self.forget()
        from guest_agent.uevent import UeventMonitor

        self._monitor = UeventMonitor().open()
        for error in self.modules().coldplug_virtio():
            self.reporter.info(f"warning: {error}")

    def wait_event(self, deadline: float) -> bool:
        """Wait for the next uevent until DEADLINE; load drivers for added devices.

        False once the deadline has passed.
        """
        remaining = deadline - time.monotonic()
        if remaining <= 0 or self._monitor is None:
            return False
        self.forget()
        event = self._monitor.wait(remaining)
        if event is not None and event.action == "add" and "MODALIAS" in event.env:
            self.modules().load(event.env["MODALIAS"])
        return time.monotonic() < deadline

    def deadline(self, options: Options) -> float:
        return self.start + options.device_timeout

    def do_mount(self, request: MountRequest) -> None:
        """Mount onto an fd the kernel resolved inside the root, so no symlink swapped in
        since our own resolution can send the mount outside it."""
        in_root = request.target.removeprefix(self.root.rstrip("/")) or "/"
        try:
            fd = open_in_root(self.root, in_root)
        except OSError as e:
            raise Failure(f"cannot open the mount point {in_root}: {e.strerror}") from None
        try:
            mount(request._replace(target_fd=fd))
        finally:
            if fd is not None:
                os.close(fd)
        self.mounted_here.append(request.target)

    def existing(self, host: str) -> Mount | None:
        """What is mounted at HOST and visible there (a hidden mount is no mount)."""
        return self.table().visible_at(host)

    # -- shares -----------------------------------------------------------------------

    def _share(self, spec: ShareSpec, store_lower: bool) -> Result:
        host = self.target(spec.where)
        read_only = spec.options.read_only
        read_only = store_lower if read_only is None else read_only
        table = self.table()
        current = table.visible_at(host)
        if current is not None:
            if current.fstype in SHARE_FSTYPES and current.source == spec.tag:
                if spec.proto in (Proto.AUTO, current.fstype):
                    return self._already(spec.where, spec.source, current)
            raise _occupied(spec.where, current)
        in_use = table.tag_in_use(spec.tag, ("9p",))
        if in_use is not None and spec.proto != Proto.VIRTIOFS:
            raise Failure(
                f"9p tag {spec.tag!r} is already mounted at {in_use.mount_point}: a 9p channel mounts once",
                "bind-mount that directory instead",
            )
        if self.dry_run:
            proto = str(spec.proto)
            return Result(
                spec.where,
                spec.source,
                "would-mount",
                proto,
                spec.tag,
                share_options(proto, spec.options, read_only),
            )
        self.coldplug()
        deadline = self.deadline(spec.options)
        while True:
            found, blind = self._locate_share(spec)
            if found is not None:
                self.need_filesystem(found)
                options = share_options(found, spec.options, read_only)
                try:
                    self.do_mount(MountRequest(found, spec.tag, host, options))
                except MountError as e:
                    # A virtiofs tag this kernel cannot list is only known to be missing
                    # when the mount says so (EINVAL): keep waiting for it then.
                    if not (blind and e.errno in (errno.EINVAL, errno.ENOENT)):
                        raise _refused(found, e) from None
                else:
                    self._check_share_root(spec, found, host)
                    return self._mounted(spec, found, spec.tag, host, options)
            if not self.wait_event(deadline):
                raise self._share_timeout(spec)

    def _check_share_root(self, spec: ShareSpec, proto: str, host: str) -> None:
        """A share whose directory the host deleted still mounts (qemu and virtiofsd hold
        it open), but is unusable: 9p shows an empty root with no links, where nothing can
        be created; virtiofs fails every access. Unmount it again and say so."""
        try:
            gone = os.stat(host).st_nlink == 0
            reason = "its root directory has been deleted on the host (it has no links)"
        except OSError as e:
            gone = True
            reason = f"its root cannot be read: {e.strerror}"
        if not gone:
            return
        try:
            umount(host)
        except MountError:
            umount(host, lazy=True)
        self.mounted_here.remove(host)
        raise Failure(
            f"{proto} share {spec.tag!r} mounted but is unusable, so it was unmounted again: {reason}",
            "the host side of the share is gone: check the directory the hypervisor exports "
            "under this tag (qemu -fsdev path=, virtiofsd --shared-dir)",
        )

    def _locate_share(self, spec: ShareSpec) -> tuple[str | None, bool]:
        """Which transport carries SPEC's tag: (proto or None, whether it is a blind try)."""
        from guest_agent.sysfs import scan_shares, virtiofs_tags_readable

        shares = self.seen("shares", lambda: scan_shares(self.sysfs))
        for proto in (Proto.NINEP, Proto.VIRTIOFS):
            if spec.proto in (Proto.AUTO, proto) and any(
                s.proto == proto and s.tag == spec.tag for s in shares
            ):
                return str(proto), False
        readable = self.seen("virtiofs-tags", lambda: virtiofs_tags_readable(self.sysfs))
        if spec.proto in (Proto.AUTO, Proto.VIRTIOFS) and not readable:
            if any(s.proto == "virtiofs" and s.tag is None for s in shares):
                return "virtiofs", True
        return None, False

    def _share_timeout(self, spec: ShareSpec) -> Failure:
        from guest_agent.sysfs import scan_shares

        seen = [
            f"{s.proto} {s.tag!r}" if s.tag else f"{s.proto} (tag not readable on this kernel)"
            for s in scan_shares(self.sysfs)
        ]
        kind = "virtio share" if spec.proto == Proto.AUTO else f"{spec.proto} share"
        waited = spec.options.device_timeout
        return Failure(
            f"no {kind} tagged {spec.tag!r} appeared within {waited:g} s"
            f" (seen: {', '.join(seen) or 'none'})",
            "check the tag given to the hypervisor, raise x-device-timeout=, or add nofail",
        )

    # -- volumes ----------------------------------------------------------------------

    def _volume(self, spec: VolumeSpec, store_lower: bool) -> Result:
        host = self.target(spec.where)
        kind, _ = spec.by
        if kind == "pseudo":
            current = self.existing(host)
            if current is not None:
                if current.fstype == spec.fstype:
                    return self._already(spec.where, spec.source, current)
                raise _occupied(spec.where, current)
            options = volume_options(spec.fstype, spec.options, store_lower)
            if self.dry_run:
                return Result(
                    spec.where, spec.source, "would-mount", spec.fstype, spec.what, options
                )
            self.need_filesystem(spec.fstype)
            return self._mount_checked(spec, spec.fstype, spec.what, host, options)
        if self.dry_run:
            return Result(
                spec.where,
                spec.source,
                "would-mount",
                spec.fstype,
                spec.what,
                volume_options(spec.fstype, spec.options, store_lower),
            )
        self.coldplug()
        device = self._wait_for_disk(spec)
        current = self.existing(host)
        if current is not None:
            if current.devnum == _devnum(device) or current.source == device:
                return self._already(spec.where, spec.source, current)
            raise _occupied(spec.where, current)
        fstype = self._volume_fstype(spec, device)
        self.need_filesystem(fstype)
        options = volume_options(fstype, spec.options, store_lower)
        return self._mount_checked(spec, fstype, device, host, options)

    def _mount_checked(
        self, spec: VolumeSpec, fstype: str, source: str, host: str, options: tuple[str, ...]
    ) -> Result:
        try:
            self.do_mount(MountRequest(fstype, source, host, options))
        except MountError as e:
            failure = _refused(fstype, e)
            if e.errno == errno.EACCES or (e.errno == errno.EROFS and "ro" not in options):
                failure.hint = (
                    "the device is read-only: add ro to the options to mount it read-only"
                )
            elif e.errno in (errno.EBADMSG, errno.EUCLEAN):  # EFSBADCRC, EFSCORRUPTED
                failure.hint = (
                    f"the {fstype} filesystem on {source} is damaged (dmesg says where); "
                    f"repair it with fsck.{fstype}: it is never formatted"
                )
            raise failure from None
        return self._mounted(spec, fstype, source, host, options)

    def _volume_fstype(self, spec: VolumeSpec, device: str) -> str:
        from guest_agent.probe import probe_device

        try:
            signature = probe_device(device)
        except OSError as e:
            raise Failure(f"cannot read {device}: {e.strerror}") from None
        if spec.options.makefs and signature is None:
            from guest_agent.blank import why_not_blank

            reason = why_not_blank(device)
            if reason is not None:
                raise Failure(
                    f"{device} carries no filesystem signature but is not blank: it {reason}; "
                    "x-makefs formats only a disk that is all zeros wherever it looks",
                    "an interrupted format or foreign data? inspect it; wipe it yourself to let x-makefs format it",
                )
            self._makefs(spec, device)
            self.forget()
            signature = probe_device(device)
        if signature is None:
            raise Failure(
                f"{device} carries no filesystem signature",
                "add x-makefs (with FSTYPE) to format a blank disk",
            )
        if signature.usage != "filesystem":
            raise Failure(f"{device} holds {signature.fstype}, not a filesystem to mount")
        if spec.fstype != "auto" and not _same_fstype(spec.fstype, signature.fstype):
            raise Failure(
                f"{device} holds {signature.fstype}, not {spec.fstype}",
                "x-makefs never formats a disk that already holds a filesystem"
                if spec.options.makefs
                else None,
            )
        return spec.fstype if spec.fstype != "auto" else signature.fstype

    def _makefs(self, spec: VolumeSpec, device: str) -> None:
        import shutil
        import subprocess

        tool = shutil.which(f"mkfs.{spec.fstype}")
        if tool is None and spec.fstype in ("ext2", "ext3", "ext4"):
            tool = shutil.which("mke2fs")
        if tool is None:
            raise Failure(f"x-makefs: no mkfs.{spec.fstype} found in PATH")
        args = (
            [tool, "-q", device]
            if "mke2fs" not in tool
            else [tool, "-q", "-t", spec.fstype, device]
        )
        if spec.fstype in ("xfs", "btrfs", "vfat"):
            args = [tool, device]
        done = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise Failure(
                f"x-makefs: {os.path.basename(tool)} failed: {said[-1] if said else done.returncode}"
            )
        self.reporter.info(f"formatted {device} ({spec.what}) as {spec.fstype}")

    def _wait_for_disk(self, spec: VolumeSpec) -> str:
        deadline = self.deadline(spec.options)
        while True:
            device = self._find_disk(spec)
            if device is not None:
                return device
            if not self.wait_event(deadline):
                raise self._disk_timeout(spec)

    def _find_disk(self, spec: VolumeSpec) -> str | None:
        from guest_agent.sysfs import scan_block_devices

        kind, value = spec.by
        if kind == "path":
            return value if os.path.exists(value) else None
        matches: list[BlockDevice] = []
        for dev in self.seen("disks", lambda: scan_block_devices(self.sysfs)):
            if kind == "serial":
                if dev.serial == value and not dev.partition:
                    matches.append(dev)
                continue
            if dev.size_bytes == 0:
                continue
            signature = self.seen(f"probe:{dev.devnode}", partial(_probe, dev.devnode))
            if signature is None:
                continue
            found = signature.label if kind == "label" else signature.uuid
            if found is not None and (
                found == value if kind == "label" else found.lower() == value.lower()
            ):
                matches.append(dev)
        if len(matches) > 1:
            names = ", ".join(d.devnode for d in matches)
            raise Failure(f"{spec.what} matches several disks ({names}); refusing to guess")
        if not matches or not os.path.exists(matches[0].devnode):
            return None
        return matches[0].devnode

    def _disk_timeout(self, spec: VolumeSpec) -> Failure:
        from guest_agent.probe import probe_device
        from guest_agent.sysfs import scan_block_devices

        seen = []
        for dev in scan_block_devices(self.sysfs):
            if not dev.virtio:
                continue
            try:
                sig = probe_device(dev.devnode) if dev.size_bytes else None
            except OSError as e:
                seen.append(f"{dev.name} (cannot be read: {e.strerror})")
                continue
            parts = [dev.name]
            if dev.serial:
                parts.append(f"serial {dev.serial}")
            if sig is not None:
                parts.append(sig.fstype + (f" label {sig.label}" if sig.label else ""))
            elif dev.size_bytes:
                parts.append("with no filesystem signature")
            seen.append(" ".join(parts))
        return Failure(
            f"no disk {spec.what} appeared within {spec.options.device_timeout:g} s"
            f" (virtio disks seen: {', '.join(seen) or 'none'})",
            "check the disk given to the hypervisor, raise x-device-timeout=, or add nofail",
        )

    # -- the store overlay ---------------------------------------------------------

    def _overlay(self, spec: OverlaySpec) -> Result:
        host = self.target(spec.where)
        if self.dry_run:
            return self._overlay_dry_run(spec, host)
        with self.open_dir(spec.rw, create=True) as rw_path, self.open_dir(spec.lower) as lower:
            rw = reopen(rw_path.fd)
            try:
                return self._overlay_on(spec, host, lower, rw_path, rw)
            finally:
                os.close(rw)

    def _overlay_dry_run(self, spec: OverlaySpec, host: str) -> Result:
        current = self.existing(host)
        if current is not None:
            if current.fstype == "overlay":
                return self._already(spec.where, spec.source, current)
            raise _occupied(spec.where, current)
        lower, rw = self.target(spec.lower, create=False), self.target(spec.rw)
        upper, work = os.path.join(rw, "store"), os.path.join(rw, "work")
        userxattr = self._upper_needs_userxattr(spec, rw)
        options = overlay_options(lower, upper, work, spec.options, userxattr)
        return Result(spec.where, spec.source, "would-mount", "overlay", "overlay", options)

    def _overlay_on(
        self, spec: OverlaySpec, host: str, lower: Opened, rw_path: Opened, rw: int
    ) -> Result:
        """Mount the overlay with LOWER, RW/store and RW/work given to the kernel as the
        directories we hold open (/proc/self/fd/N), never as paths it would resolve again."""
        table = self.table()
        current = table.visible_at(host)
        reset = self.reset_requested or self._owned(spec, overlay_reset.request_pending, rw)
        if current is not None:
            if current.fstype == "overlay":
                # A cmdline flag was applied by this boot's first run; a scheduled request
                # (reset-overlay while mounted) waits for the next boot.
                if reset and not self.reset_requested:
                    self.reporter.info(
                        f"{spec.where} is already mounted: the scheduled reset applies at the next boot"
                    )
                return self._already(spec.where, spec.source, current)
            raise _occupied(spec.where, current)
        wrong = overlay_reset.check_names(rw, resetting=reset)
        if wrong:
            raise _wrong_type(spec, *wrong)
        rw_host = host_path(self.root, rw_path.path)
        userxattr = self._upper_needs_userxattr(spec, rw_host)
        # Before anything is made or moved: a reset must never move the lower layer aside.
        _check_overlap(spec, lower.fd, rw, whole_rw=True)
        if overlay_reset.check_dir(rw, "store"):
            with _closing(overlay_reset.open_dir(rw, "store", create=False)) as store:
                in_use = overlay_users(table, host, store)
            if in_use:
                raise _in_use(spec, in_use[0], "not mounting it a second time")
        if reset:
            self._reset(rw, spec)
        store = self._layer_dir(rw, "store", spec)
        try:
            work = self._layer_dir(rw, "work", spec)
            try:
                _check_overlap(spec, lower.fd, rw)
                lower_fd, store_fd, work_fd = (
                    f"/proc/self/fd/{fd}" for fd in (lower.fd, store, work)
                )
                options = overlay_options(lower_fd, store_fd, work_fd, spec.options, userxattr)
                self.need_filesystem("overlay")
                try:
                    self.do_mount(MountRequest("overlay", "overlay", host, options))
                except MountError as e:
                    raise _refused("overlay", e) from None
            finally:
                os.close(work)
        finally:
            os.close(store)
        self._empty_trash(rw, spec)
        shown = overlay_options(
            host_path(self.root, lower.path),
            os.path.join(rw_host, "store"),
            os.path.join(rw_host, "work"),
            spec.options,
            userxattr,
        )
        self.reporter.info(
            f"mounted overlay at {spec.where} (lower {spec.lower}, upper {spec.upper}"
            + (", userxattr" if "userxattr" in options else "")
            + ")"
        )
        return Result(spec.where, spec.source, "mounted", "overlay", "overlay", shown)

    def _upper_needs_userxattr(self, spec: OverlaySpec, rw: str) -> bool:
        """userxattr when RW (or RW/store) lives on virtiofs/FUSE; a 9p upper is refused."""
        table = self.table()
        userxattr = False
        upper = os.path.join(rw, "store")
        for path in (rw, upper):  # something could be mounted on RW/store itself
            holder = table.containing(path)
            if holder is None:
                continue
            if holder.fstype == "9p":
                problem = upper_on_9p(spec, f"{holder.source} at {holder.mount_point}")
                raise Failure(problem.reason, problem.hint)
            userxattr = userxattr or holder.fstype == "virtiofs" or holder.fstype.startswith("fuse")
        return userxattr

    def _owned(self, spec: OverlaySpec, look: Callable[[int], bool], rw: int) -> bool:
        try:
            return look(rw)
        except overlay_reset.WrongType as e:
            raise _wrong_type(spec, e) from None

    def _layer_dir(self, rw: int, name: str, spec: OverlaySpec) -> int:
        """Open RW/NAME (made if missing); on a full RW volume, first delete the trash of a
        reset (the only way to get the space back), synchronously since the overlay needs
        the dir now."""
        try:
            try:
                return overlay_reset.open_dir(rw, name, create=True)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                trash = overlay_reset.open_trash(rw)
                if trash is None:
                    raise
            self.reporter.info(
                f"{spec.rw} is full: deleting the old upper layer now, before mounting {spec.where}"
            )
            with _closing(trash):
                overlay_reset.empty_trash(trash)
            return overlay_reset.open_dir(rw, name, create=True)
        except overlay_reset.WrongType as e:
            raise _wrong_type(spec, e) from None
        except OSError as e:
            raise Failure(f"cannot create {spec.rw}/{name}: {e.strerror}") from None

    def _empty_trash(self, rw: int, spec: OverlaySpec) -> None:
        """Delete what an earlier reset moved aside, in the background. A trash that is not
        the agent's directory is left alone and reported."""
        try:
            trash = overlay_reset.open_trash(rw)
        except overlay_reset.WrongType as e:
            self.reporter.info(
                f"warning: {spec.rw}/{e}: the trash is left alone (remove it by hand if it is not yours)"
            )
            return
        except OSError:
            return
        if trash is not None:
            with _closing(trash):
                overlay_reset.empty_trash_in_background(trash)

    def _reset(self, rw: int, spec: OverlaySpec) -> None:
        try:
            moved = overlay_reset.move_aside(rw)
        except overlay_reset.WrongType as e:
            raise _wrong_type(spec, e) from None
        except OSError as e:
            raise Failure(
                f"reset of the upper layer failed: {e.strerror}; nothing was mounted"
            ) from None
        self.reporter.info(
            f"reset the {spec.where} upper layer: moved {moved} dir(s) of {spec.rw} aside, "
            "deleting them in the background"
        )

    # -- results --------------------------------------------------------------------

    def _already(self, where: str, source: str, current: Mount) -> Result:
        self.reporter.info(f"{where}: already mounted ({current.fstype} {current.source})")
        return Result(
            where, source, "already-mounted", current.fstype, current.source, current.super_options
        )

    def _mounted(
        self,
        spec: ShareSpec | VolumeSpec,
        fstype: str,
        source: str,
        host: str,
        options: tuple[str, ...],
    ) -> Result:
        shown = ", ".join(o for o in options if o.split("=")[0] in ("msize", "cache", "ro", "rw"))
        if "ro" not in options and "rw" not in options:
            shown = f"{shown}, rw" if shown else "rw"
        label = (
            source
            if isinstance(spec, ShareSpec) or source == spec.what
            else f"{source} ({spec.what})"
        )
        self.reporter.info(f"mounted {fstype} {label} at {spec.where} ({shown})")
        return Result(spec.where, spec.source, "mounted", fstype, source, options)

    def undo(self) -> None:
        """Unmount what this run mounted, newest first (used by reset-overlay)."""
        for target in reversed(self.mounted_here):
            try:
                umount(target)
            except MountError:
                umount(target, lazy=True)
        self.mounted_here.clear()


def _devnum(device: str) -> tuple[int, int]:
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return (-1, -1)
    return os.major(rdev), os.minor(rdev)


def _probe(device: str) -> Signature | None:
    from guest_agent.probe import probe_device

    try:
        return probe_device(device)
    except OSError:
        return None


def _same_fstype(wanted: str, found: str) -> bool:
    ext = ("ext2", "ext3", "ext4")
    return wanted == found or (wanted in ext and found in ext)


def _occupied(where: str, current: Mount) -> Failure:
    return Failure(
        f"{where} already has {current.fstype} from {current.source} mounted on it; not mounting over it",
        "unmount it first, or choose another mount point",
    )


def _wrong_type(spec: OverlaySpec, *wrong: overlay_reset.WrongType) -> Failure:
    found = "; ".join(f"{spec.rw}/{w}" for w in wrong)
    names = " and ".join(f"{spec.rw}/{w.name}" for w in wrong)
    return Failure(
        f"{found} ({'names' if len(wrong) > 1 else 'a name'} the agent owns): refusing to"
        " follow or delete it, nothing was mounted or moved",
        f"remove {names} by hand if it is not yours",
    )


def _check_overlap(spec: OverlaySpec, lower: int, rw: int, *, whole_rw: bool = False) -> None:
    """Refuse LOWER and the layer dirs under RW (those that exist) when one is inside the
    other, judged on the directories themselves ((dev, ino) up the `..` chain), so that a
    symbolic link or a bind mount cannot hide it; with WHOLE_RW, LOWER and RW themselves
    (the rule the parser applies to the paths as written)."""
    overlap = whole_rw and overlapping(lower, rw)
    for name in overlay_reset.LAYERS:
        if overlap:
            break
        if overlay_reset.check_dir(rw, name):
            with _closing(overlay_reset.open_dir(rw, name, create=False)) as layer:
                overlap = overlapping(lower, layer)
    if overlap:
        raise Failure(
            f"the lower layer {spec.lower} and {spec.rw} overlap (one is inside the other,"
            " through a symbolic link or a bind mount): nothing was mounted or moved",
            "LOWER and RW must be separate directories",
        )


def _in_use(spec: OverlaySpec, user: Mount, what: str) -> Failure:
    return Failure(
        f"the upper layer {spec.upper} is in use by the overlay mounted at {user.mount_point}:"
        f" {what}",
        "unmount every mount of that overlay first",
    )


def overlay_users(table: MountTable, where: str, store: int) -> list[Mount]:
    """The mounts of an overlay whose upper layer is the directory STORE (an fd).

    Such an overlay is found by what the table shows: mounted at WHERE (also when
    covered by a later mount), or with an `upperdir=` path naming STORE, or with a
    root reporting STORE's inode (an overlay's root directory shows its upper
    directory's inode number); then every mount of the same superblock anywhere,
    bind mounts included. Layers given as /proc/self/fd/N name nothing afterwards,
    hence the inode; a coincidence can only make a reset refuse, never wipe.
    """
    store_dev, store_ino = identity(store)
    overlays: set[tuple[int, int]] = set()
    for m in table.mounts:
        if m.fstype != "overlay":
            continue
        if m.mount_point == where:
            overlays.add(m.devnum)
            continue
        upper = next((o[9:] for o in m.super_options if o.startswith("upperdir=")), "")
        try:
            if upper.startswith("/") and not upper.startswith("/proc/"):
                st = os.stat(upper)
                if (st.st_dev, st.st_ino) == (store_dev, store_ino):
                    overlays.add(m.devnum)
                continue
            st = os.stat(m.mount_point)  # layers given by fd: the root's inode tells
        except (OSError, ValueError):
            continue
        if (os.major(st.st_dev), os.minor(st.st_dev)) == m.devnum and st.st_ino == store_ino:
            overlays.add(m.devnum)
    return [m for m in table.mounts if m.devnum in overlays]


class _closing:
    """Close an fd when the block ends (None is allowed and ignored)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def __enter__(self) -> int:
        assert self.fd is not None
        return self.fd

    def __exit__(self, *_: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _refused(fstype: str, error: MountError) -> Failure:
    where = f" ({error.step})" if error.step and error.step not in ("create", "move_mount") else ""
    return Failure(f"the kernel refused to mount {fstype}{where}: {error}")

"""Real-VM test bed: boot Linux guests under qemu (TCG) with virtio devices.

A :class:`VM` boots a kernel from the test bed cache (made by
``tools/setup-testbed``) with a base initramfs (made by
``initrd-hooks/build-initramfs``) plus a small per-boot cpio archive holding
the test script as ``/test/run``. The guest's ``/init`` runs that script with
its output on the second serial port (the *results channel*), then powers
off. The kernel console (first serial port) goes to a separate log.

Devices are attached the way microvm.nix's qemu runner does:

* 9p: ``-fsdev local,...,security_model=none`` + ``virtio-9p-pci``;
* virtio-fs: one virtiofsd per share + ``vhost-user-fs-pci`` on a shared
  ``memory-backend-memfd``;
* volumes: ``-drive ...,if=none`` + ``virtio-blk-pci,serial=...``.

With ``machine="microvm"`` (qemu's microvm machine, as microvm.nix's qemu
runner without PCI, firecracker and stratovirt do) the same devices go on
virtio-mmio: ``virtio-9p-device``, ``vhost-user-fs-device``,
``virtio-blk-device``; with ``machine="microvm,pcie=on"`` (microvm.nix's qemu
runner when a share needs PCI) they are the ``-pci`` ones behind its PCIe bridge. That machine has one ISA serial port; the results
channel is a second ``isa-serial`` device (ttyS1, as on q35), and the kernel
gets ``tsc_early_khz=`` with the host's TSC rate (no HPET or ACPI PM timer
there: a failed TSC calibration against the PIT hangs about half the boots).

Example::

    vm = VM(testbed, "6.1", initramfs, workdir,
            shares=[Share("data", host_dir)], disks=[Disk(img, serial="store")])
    r = vm.boot("mount -t 9p -o trans=virtio data /mnt && cat /mnt/hello")
    assert r.exit_code == 0, r

Disk images and share directories are the caller's and stay between boots:
calling :meth:`VM.boot` again is a reboot.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILDER = REPO_ROOT / "initrd-hooks" / "build-initramfs"
DEFAULT_CACHE = Path("/var/cache/guest-agent-testbed")
KERNELS = ("6.1", "6.12")
QEMU = "qemu-system-x86_64"
EXIT_MARKER = re.compile(r"^@@testbed-exit=(\d+)@@$", re.M)
SETUP_HINT = "run `sudo tools/setup-testbed` (as root, on Debian 12) to set up the VM test bed"

#: Every boot made in this process: (label, kernel, seconds). The pytest
#: plugin in conftest.py prints a summary.
BOOT_LOG: list[tuple[str, str, float]] = []


#: qemu device names per transport: PCI (q35) and virtio-mmio (microvm).
DEVICES = {
    "pci": {"9p": "virtio-9p-pci", "virtiofs": "vhost-user-fs-pci", "blk": "virtio-blk-pci"},
    "mmio": {
        "9p": "virtio-9p-device",
        "virtiofs": "vhost-user-fs-device",
        "blk": "virtio-blk-device",
    },
}


def is_microvm(machine: str) -> bool:
    """qemu's microvm machine type ("microvm" or "microvm,OPTIONS")."""
    return machine.split(",", 1)[0] == "microvm"


def transport(machine: str) -> Literal["pci", "mmio"]:
    """The virtio transport of a qemu machine type: mmio on microvm unless it has its PCIe
    host bridge ("microvm,pcie=on", microvm.nix's qemu runner when a share needs PCI)."""
    return "mmio" if is_microvm(machine) and "pcie=on" not in machine.split(",") else "pci"


def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz ("cpu MHz" of /proc/cpuinfo), which TCG guests see."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    return round(float(m.group(1)) * 1000) if m else None


class TestbedError(RuntimeError):
    """The test bed is not set up (or is broken)."""


# --------------------------------------------------------------------------
# The cache made by tools/setup-testbed
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Testbed:
    cache: Path

    @classmethod
    def from_env(cls) -> Testbed:
        return cls(Path(os.environ.get("GA_TESTBED_CACHE", DEFAULT_CACHE)))

    def kernel_dir(self, kernel: str) -> Path:
        return self.cache / "kernels" / kernel

    def vmlinuz(self, kernel: str) -> Path:
        return self.kernel_dir(kernel) / "vmlinuz"

    def boot_image(self, kernel: str) -> Path:
        """The uncompressed vmlinux (PVH entry, ~2 s faster under TCG) or vmlinuz."""
        vmlinux = self.kernel_dir(kernel) / "vmlinux"
        return vmlinux if vmlinux.exists() else self.vmlinuz(kernel)

    def release(self, kernel: str) -> str:
        return (self.kernel_dir(kernel) / "release").read_text().strip()

    @property
    def virtiofsd(self) -> Path:
        return self.cache / "bin" / "virtiofsd"

    @property
    def mkfs_erofs(self) -> Path:
        return self.cache / "bin" / "mkfs.erofs"

    def missing(self) -> list[str]:
        """What is not there; empty when the test bed is ready."""
        out = []
        for k in KERNELS:
            for p in (
                self.vmlinuz(k),
                self.kernel_dir(k) / "release",
                self.kernel_dir(k) / "modules" / "kernel",
            ):
                if not p.exists():
                    out.append(str(p))
        for p in (
            self.virtiofsd,
            self.mkfs_erofs,
            Path("/usr/bin/python3.11"),
            Path("/bin/busybox"),
            Path("/sbin/mke2fs"),
        ):
            if not p.exists():
                out.append(str(p))
        for tool in (QEMU, "mksquashfs", "depmod"):
            if shutil.which(tool) is None:
                out.append(tool)
        return out

    def check(self) -> None:
        missing = self.missing()
        if missing:
            raise TestbedError(
                f"VM test bed not ready in {self.cache} (missing: {', '.join(missing)}); "
                + SETUP_HINT
            )


# --------------------------------------------------------------------------
# Base initramfs (cached by a hash of its inputs)
# --------------------------------------------------------------------------


def build_wheels(dest: Path, project: Path = REPO_ROOT) -> list[Path]:
    """Wheels of the project and of its dependencies (from PyPI or pip's cache)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(dest),
            str(project),
        ],
        check=True,
    )
    wheels = sorted(dest.glob("*.whl"))
    if not any(w.name.startswith("guest_agent-") for w in wheels):
        raise TestbedError(f"pip built no guest_agent wheel in {dest}")
    return wheels


def _wheel_digest(wheel: Path) -> str:
    """Digest of a wheel's content (not of its zip timestamps)."""
    h = hashlib.sha256(wheel.name.encode())
    with zipfile.ZipFile(wheel) as zf:
        for info in sorted(zf.infolist(), key=lambda i: i.filename):
            h.update(info.filename.encode() + b"\0")
            h.update(hashlib.sha256(zf.read(info)).digest())
    return h.hexdigest()


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


#: What the Nix variant of the initramfs copies from the host (build-initramfs --nix).
NIX_INPUTS = (
    Path("/usr/bin/nix"),
    Path("/usr/lib/nix/libnixstore.so"),
    Path("/usr/lib/nix/libnixexpr.so"),
    Path("/usr/lib/x86_64-linux-gnu/libsqlite3.so.0"),
)


def base_initramfs(
    testbed: Testbed,
    kernel: str,
    wheels: Sequence[Path],
    out_dir: Path | None = None,
    *,
    nix: bool = False,
) -> Path:
    """Build (or reuse) the base initramfs for kernel with these wheels.

    nix=True: the Nix variant (build-initramfs --nix: Debian's nix-bin, nix.conf,
    /dev/pts, Python's sqlite3), cached apart from the base image; only the Nix
    tests use it, the other boots keep the small base image.
    """
    h = hashlib.sha256()
    h.update(BUILDER.read_bytes())
    h.update(testbed.release(kernel).encode())
    for tool in (Path("/usr/bin/python3.11"), Path("/bin/busybox"), Path("/sbin/mke2fs")):
        h.update(_file_stamp(tool).encode())
    for w in sorted(wheels):
        h.update(_wheel_digest(w).encode())
    if nix:
        h.update(b"nix")
        for tool in NIX_INPUTS:
            h.update(_file_stamp(tool.resolve()).encode())
    key = h.hexdigest()[:16]
    prefix = f"nix-{kernel}" if nix else f"base-{kernel}"
    if out_dir is None:
        out_dir = testbed.cache / "initramfs"
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(out_dir, os.W_OK):
                raise PermissionError(out_dir)
        except OSError:
            out_dir = Path(tempfile.gettempdir()) / "guest-agent-testbed-initramfs"
            out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{prefix}-{key}.cpio"
    if out.exists():
        return out
    cmd = [
        sys.executable,
        str(BUILDER),
        "--cache",
        str(testbed.cache),
        "--kernel",
        kernel,
        "-o",
        str(out),
    ]
    for w in wheels:
        cmd += ["--wheel", str(w)]
    if nix:
        cmd.append("--nix")
    subprocess.run(cmd, check=True)
    # Keep only the newest few images of this kernel (and variant).
    old = sorted(out_dir.glob(f"{prefix}-*.cpio"), key=lambda p: p.stat().st_mtime)
    for stale in old[:-3]:
        stale.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------
# Per-boot cpio archive
# --------------------------------------------------------------------------


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    bname = name.encode()
    fields = (ino, mode, 0, 0, 1, int(time.time()), len(data), 0, 0, 0, 0, len(bname) + 1, 0)
    hdr = b"070701" + b"".join(b"%08X" % f for f in fields) + bname + b"\0"
    hdr += b"\0" * (-len(hdr) % 4)
    return hdr + data + b"\0" * (-len(data) % 4)


def overlay_cpio(files: Mapping[str, str | bytes], executable: Iterable[str] = ()) -> bytes:
    """A newc archive with these files (guest path -> content), parents included."""
    execs = {p.lstrip("/") for p in executable}
    dirs: set[str] = set()
    for p in files:
        parts = p.lstrip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    out = bytearray()
    ino = 900000
    for d in sorted(dirs):
        out += _newc_entry(d, stat.S_IFDIR | 0o755, ino=ino)
        ino += 1
    for p, content in sorted(files.items()):
        rel = p.lstrip("/")
        data = content.encode() if isinstance(content, str) else content
        mode = 0o755 if rel in execs else 0o644
        out += _newc_entry(rel, stat.S_IFREG | mode, data, ino=ino)
        ino += 1
    out += _newc_entry("TRAILER!!!", 0)
    return bytes(out)


# --------------------------------------------------------------------------
# Devices and results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Share:
    """A host directory exported to the guest under a tag."""

    tag: str
    host_dir: Path
    proto: Literal["9p", "virtiofs"] = "9p"
    readonly: bool = False
    #: virtiofsd --cache mode (virtiofs only)
    cache: str = "auto"
    #: extra virtiofsd arguments (virtiofs only); xattrs are on by default
    #: because an overlay upper on virtio-fs needs them.
    virtiofsd_args: tuple[str, ...] = ("--xattr",)


@dataclass(frozen=True)
class Disk:
    """A raw disk image attached as virtio-blk."""

    image: Path
    serial: str | None = None
    readonly: bool = False


@dataclass
class BootResult:
    results: str
    """The results channel (the test script's stdout+stderr), exit marker removed."""
    console: str
    """The kernel console (ttyS0)."""
    qemu_log: str
    """qemu's and virtiofsd's own stderr."""
    exit_code: int | None
    """The test script's exit status; None if it did not finish."""
    timed_out: bool
    killed_at_marker: bool
    qemu_returncode: int | None
    duration: float
    workdir: Path

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def __str__(self) -> str:
        tail = "\n".join(self.console.splitlines()[-40:])
        return (
            f"BootResult(exit_code={self.exit_code}, timed_out={self.timed_out}, "
            f"killed_at_marker={self.killed_at_marker}, qemu_rc={self.qemu_returncode}, "
            f"{self.duration:.1f}s, workdir={self.workdir})\n"
            f"--- results ---\n{self.results}\n--- console (tail) ---\n{tail}\n"
            f"--- qemu ---\n{self.qemu_log}"
        )


class _Qmp:
    """A minimal QMP client: hot-plugs virtio-blk disks into a running guest."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self._reply()  # the greeting
        self.call("qmp_capabilities")

    def _reply(self) -> dict[str, object]:
        while True:
            line = self.file.readline()
            if not line:
                raise TestbedError("QMP: qemu closed the monitor")
            msg = json.loads(line)
            if "event" not in msg:
                return dict(msg)

    def call(self, command: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        self.file.flush()
        reply = self._reply()
        if "error" in reply:
            raise TestbedError(f"QMP {command} failed: {reply['error']}")
        return reply.get("return")

    def plug(self, disk: Disk, index: int) -> None:
        self.call(
            "blockdev-add",
            driver="raw",
            **{"node-name": f"hp{index}", "read-only": disk.readonly},
            file={"driver": "file", "filename": str(disk.image)},
        )
        dev: dict[str, object] = {"driver": "virtio-blk-pci", "drive": f"hp{index}"}
        dev.update(id=f"hpdev{index}", bus=f"hpport{index}")
        if disk.serial is not None:
            dev["serial"] = disk.serial
        self.call("device_add", **dev)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class _Hotplugger:
    """Plugs each (delay, disk) when its delay has passed since qemu started, or since a
    results line contained `at` when that is given."""

    def __init__(
        self,
        plan: Sequence[tuple[float, Disk]],
        at: str | None,
        sock: Path,
        log: Path,
        start: float,
    ) -> None:
        self.pending = sorted(enumerate(plan), key=lambda p: p[1][0])
        self.at, self.sock, self.log, self.start = at, sock, log, start
        self.clock = None if at else time.monotonic()
        self.qmp: _Qmp | None = None

    def poll(self, results: Path) -> None:
        if not self.pending:
            return
        if self.clock is None:
            if not (self.at and results.exists() and self.at in _read(results)):
                return
            self.clock = time.monotonic()
        while self.pending and time.monotonic() >= self.clock + self.pending[0][1][0]:
            index, (_, disk) = self.pending.pop(0)
            self.qmp = self.qmp or _Qmp(self.sock)
            self.qmp.plug(disk, index)
            with self.log.open("a") as f:
                f.write(
                    f"testbed: hot-plugged {disk.image} at {time.monotonic() - self.start:.1f}s\n"
                )

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()


def _kill(proc: subprocess.Popen[bytes], grace: float = 2.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------
# The VM
# --------------------------------------------------------------------------


@dataclass
class VM:
    """A guest configuration; each :meth:`boot` is one power-on to power-off."""

    testbed: Testbed
    kernel: str
    initramfs: Path
    workdir: Path
    cmdline: str = ""
    shares: list[Share] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    script: str = ""
    timeout: float = 90.0
    memory_mb: int = 512
    machine: str = "q35"
    cpus: int = 1
    #: qemu64 plus RDRAND: the guest kernel seeds its RNG at once instead of
    #: blocking the first getrandom() (Python's start) for about a second.
    cpu: str = "qemu64,+rdrand"
    #: extra qemu arguments, e.g. ["-device", "virtio-rng-pci"]
    qemu_args: list[str] = field(default_factory=list)
    label: str = "vm"
    boots: int = 0

    def kernel_cmdline(self, extra: str = "") -> str:
        # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can
        # time out and panic ("IO-APIC + timer doesn't work!"); VMs skip it routinely.
        base = "console=ttyS0 panic=-1 oops=panic no_timer_check"
        if is_microvm(self.machine):
            khz = host_tsc_khz()
            if khz:  # microvm: no HPET/PM timer to calibrate the TSC against under TCG
                base += f" tsc_early_khz={khz}"
        return " ".join(s for s in (base, self.cmdline, extra) if s)

    @property
    def transport(self) -> Literal["pci", "mmio"]:
        return transport(self.machine)

    def qemu_command(
        self,
        initrd: Path,
        sockets: Sequence[Path],
        console: Path,
        results: Path,
        extra_cmdline: str = "",
    ) -> list[str]:
        mem = f"{self.memory_mb}M"
        cmd = [QEMU, "-accel", "tcg", "-nodefaults", "-no-user-config", "-no-reboot"]
        cmd += ["-display", "none"]
        cmd += ["-machine", f"{self.machine},memory-backend=mem", "-cpu", self.cpu]
        cmd += ["-m", mem, "-smp", str(self.cpus)]
        cmd += ["-object", f"memory-backend-memfd,id=mem,size={mem},share=on"]
        cmd += ["-kernel", str(self.testbed.boot_image(self.kernel)), "-initrd", str(initrd)]
        cmd += ["-append", self.kernel_cmdline(extra_cmdline)]
        cmd += ["-chardev", f"file,id=console,path={console}", "-serial", "chardev:console"]
        cmd += ["-chardev", f"file,id=results,path={results}"]
        if is_microvm(self.machine):  # one ISA serial port built in: add the second
            cmd += ["-device", "isa-serial,chardev=results,index=1"]
        else:
            cmd += ["-serial", "chardev:results"]
        names = DEVICES[self.transport]
        vfs = iter(sockets)
        for i, share in enumerate(self.shares):
            if share.proto == "9p":
                fsdev = f"local,id=fs{i},path={share.host_dir},security_model=none"
                if share.readonly:
                    fsdev += ",readonly=on"
                cmd += [
                    "-fsdev",
                    fsdev,
                    "-device",
                    f"{names['9p']},fsdev=fs{i},mount_tag={share.tag}",
                ]
            elif share.proto == "virtiofs":
                cmd += [
                    "-chardev",
                    f"socket,id=vfs{i},path={next(vfs)}",
                    "-device",
                    f"{names['virtiofs']},chardev=vfs{i},tag={share.tag}",
                ]
            else:
                raise ValueError(f"unknown share protocol {share.proto!r}")
        for i, disk in enumerate(self.disks):
            drive = f"file={disk.image},format=raw,if=none,id=d{i}"
            if disk.readonly:
                drive += ",readonly=on"
            dev = f"{names['blk']},drive=d{i}"
            if disk.serial is not None:
                dev += f",serial={disk.serial}"
            cmd += ["-drive", drive, "-device", dev]
        return cmd + self.qemu_args

    def _start_virtiofsd(
        self, rundir: Path, log: Path
    ) -> tuple[list[Path], list[subprocess.Popen[bytes]]]:
        sockets: list[Path] = []
        procs: list[subprocess.Popen[bytes]] = []
        for i, share in enumerate(self.shares):
            if share.proto != "virtiofs":
                continue
            sock = rundir / f"vfs{i}.sock"
            cmd = [
                str(self.testbed.virtiofsd),
                f"--socket-path={sock}",
                f"--shared-dir={share.host_dir}",
                "--sandbox=none",
                f"--cache={share.cache}",
                *share.virtiofsd_args,
            ]
            if share.readonly:
                cmd.append("--readonly")
            with log.open("ab") as lf:
                procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf))
            sockets.append(sock)
        deadline = time.monotonic() + 10
        for sock, proc in zip(sockets, procs, strict=True):
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    for p in procs:
                        _kill(p)
                    raise TestbedError(f"virtiofsd did not start:\n{log.read_text()}")
                time.sleep(0.01)
        return sockets, procs

    def boot(
        self,
        script: str | None = None,
        *,
        kill_at: str | None = None,
        timeout: float | None = None,
        extra_cmdline: str = "",
        files: Mapping[str, str | bytes] | None = None,
        hotplug: Sequence[tuple[float, Disk]] = (),
        hotplug_at: str | None = None,
    ) -> BootResult:
        """Boot once, run script (default: self.script) as /test/run, return what came out.

        kill_at: kill qemu (a power cut: SIGKILL, no sync) as soon as a results
        line contains this text. files: extra guest files (path -> content) for
        this boot. Disk images and share directories are left as the guest left
        them, so booting again is a reboot. hotplug: (delay, disk) pairs: each disk is
        hot-plugged (QMP: blockdev-add + device_add of a virtio-blk-pci into its own
        pcie-root-port; q35 only) delay seconds after qemu starts, or after a results
        line contains hotplug_at when that is given.
        """
        self.testbed.check()
        self.boots += 1
        run = self.workdir / f"boot{self.boots}"
        run.mkdir(parents=True, exist_ok=True)
        console, results, qlog = run / "console.log", run / "results.log", run / "qemu.log"
        text = script if script is not None else self.script
        if not text.startswith("#!"):
            text = "#!/bin/sh\n" + text
        overlay = overlay_cpio({"test/run": text, **(files or {})}, executable=["test/run"])
        initrd = run / "initrd.cpio"
        with initrd.open("wb") as out, self.initramfs.open("rb") as base:
            shutil.copyfileobj(base, out, 1 << 20)
            out.write(b"\0" * (-out.tell() % 4))
            out.write(overlay)
        timeout = self.timeout if timeout is None else timeout

        start = time.monotonic()
        sockets, helpers = self._start_virtiofsd(run, qlog)
        timed_out = killed = False
        try:
            cmd = self.qemu_command(initrd, sockets, console, results, extra_cmdline)
            if hotplug:
                cmd += ["-qmp", f"unix:{run / 'qmp.sock'},server=on,wait=off"]
                for i in range(len(hotplug)):
                    cmd += ["-device", f"pcie-root-port,id=hpport{i},chassis={i + 1},bus=pcie.0"]
            (run / "qemu.cmd").write_text(" ".join(cmd) + "\n")
            with qlog.open("ab") as lf:
                qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
            plugger = _Hotplugger(hotplug, hotplug_at, run / "qmp.sock", qlog, start)
            try:
                deadline = start + timeout
                while qemu.poll() is None:
                    plugger.poll(results)
                    if kill_at is not None and results.exists() and kill_at in _read(results):
                        qemu.kill()
                        killed = True
                        break
                    if time.monotonic() > deadline:
                        qemu.kill()
                        timed_out = True
                        break
                    time.sleep(0.02)
                qemu.wait()
            finally:
                plugger.close()
                _kill(qemu)
        finally:
            for h in helpers:
                _kill(h)
        duration = time.monotonic() - start
        initrd.unlink(missing_ok=True)
        BOOT_LOG.append((self.label, self.kernel, duration))

        out = _read(results) if results.exists() else ""
        m = EXIT_MARKER.search(out)
        exit_code = int(m.group(1)) if m else None
        out = EXIT_MARKER.sub("", out).rstrip("\n")
        if out:
            out += "\n"
        return BootResult(
            results=out,
            console=_read(console) if console.exists() else "",
            qemu_log=_read(qlog) if qlog.exists() else "",
            exit_code=exit_code,
            timed_out=timed_out,
            killed_at_marker=killed,
            qemu_returncode=qemu.returncode,
            duration=duration,
            workdir=run,
        )


def _read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace").replace("\r\n", "\n")


# --------------------------------------------------------------------------
# Disk images
# --------------------------------------------------------------------------


def blank_image(path: Path, size: int | str = "64M") -> Path:
    """A sparse raw image full of zeros (no file system)."""
    path.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", str(size), str(path)], check=True)
    return path


def ext4_image(
    path: Path,
    size: int | str = "64M",
    *,
    label: str | None = None,
    uuid: str | None = None,
    populate: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Path:
    """An ext4 image, optionally labelled and pre-populated from a directory."""
    blank_image(path, size)
    cmd = ["mkfs.ext4", "-q", "-F"]
    if label is not None:
        cmd += ["-L", label]
    if uuid is not None:
        cmd += ["-U", uuid]
    if populate is not None:
        cmd += ["-d", str(populate)]
    cmd += [*extra_args, str(path)]
    subprocess.run(cmd, check=True, env={**os.environ, "PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    return path


def erofs_image(
    path: Path,
    source: Path,
    *,
    label: str | None = "nix-store",
    testbed: Testbed | None = None,
    extra_args: Sequence[str] = (),
) -> Path:
    """An erofs image of a directory (Debian 13's mkfs.erofs, which can label)."""
    tb = testbed or Testbed.from_env()
    path.unlink(missing_ok=True)
    cmd = [str(tb.mkfs_erofs)]
    if label is not None:
        cmd += ["-L", label]
    cmd += [*extra_args, str(path), str(source)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def squashfs_image(path: Path, source: Path, *, extra_args: Sequence[str] = ()) -> Path:
    """A squashfs image of a directory (files owned by root)."""
    path.unlink(missing_ok=True)
    subprocess.run(
        [
            "mksquashfs",
            str(source),
            str(path),
            "-noappend",
            "-quiet",
            "-all-root",
            "-no-progress",
            *extra_args,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return path


def blkid(path: Path, tag: str) -> str:
    """A blkid tag (LABEL, UUID, TYPE) of an image on the host."""
    return subprocess.run(
        ["blkid", "-o", "value", "-s", tag, str(path)], capture_output=True, text=True, check=False
    ).stdout.strip()


def ext4_names(image: Path, directory: str = "/store") -> list[str]:
    """The names in DIRECTORY of the ext4 image IMAGE, read on the host with debugfs
    without mounting it (a whiteout or a file alike; `.` and `..` left out)."""
    out = subprocess.run(
        ["debugfs", "-R", f"ls {directory}", str(image)], capture_output=True, text=True, check=True
    ).stdout
    return sorted(
        n for n in out.split() if not n.startswith("(") and n not in (".", "..") and not n.isdigit()
    )


def depmod_full_tree(testbed: Testbed, kernel: str, base: Path) -> Path:
    """KERNEL's whole module tree (4 000-odd modules: what an initrd with every module
    carries) depmod'ed on the host under BASE (the modules linked, not copied): the
    modules directory BASE/lib/modules/RELEASE with depmod's text and binary indexes."""
    release = testbed.release(kernel)
    src = (testbed.kernel_dir(kernel) / "modules").resolve()
    if not (src / "kernel").is_dir() or shutil.which("depmod") is None:
        raise TestbedError(f"no module tree in {src} or no depmod: run tools/setup-testbed")
    tree = base / "lib" / "modules" / release
    tree.mkdir(parents=True)
    (tree / "kernel").symlink_to(src / "kernel")
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (src / name).exists():
            shutil.copy(src / name, tree / name)
    subprocess.run(["depmod", "-b", str(base), release], check=True)
    return tree

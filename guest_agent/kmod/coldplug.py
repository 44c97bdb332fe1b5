"""Virtio coldplug without udev: load the drivers of virtio devices that have none yet.

A device the kernel found before its driver was loaded sits in sysfs with a
`modalias` and no `driver` link; loading the module that alias names binds it.
PCI and mmio transports first, then the virtio bus devices their probing made.
The loading is guest_agent.kmod.loader's (ModuleLoader.coldplug_virtio calls here).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

VIRTIO_PCI_VENDOR = 0x1AF4


def coldplug_virtio(
    load: Callable[[str], str | None],
    sysfs: str = "/sys",
    preload: Callable[[list[str]], None] | None = None,
) -> list[str]:
    """Load (with LOAD, which returns an error message or None) drivers for driverless
    virtio devices: PCI, then mmio, then the virtio bus. Returns the distinct errors.
    PRELOAD, when given, gets each round's modaliases first (to load them in parallel;
    LOAD then finds them in)."""
    bus = os.path.join(sysfs, "bus")
    transports = driverless(os.path.join(bus, "pci/devices"), _is_virtio_pci) + driverless(
        os.path.join(bus, "platform/devices"), _is_virtio_mmio
    )
    errors = _load_all(load, transports, preload)
    # virtio_pci / virtio_mmio probing created the virtio bus devices: rescan.
    devices = driverless(os.path.join(bus, "virtio/devices"), lambda _d, m: True)
    return errors + _load_all(load, devices, preload)


def driverless(bus_dir: str, accept: Callable[[str, str], bool]) -> list[str]:
    """Modaliases of devices under bus_dir that have one and no bound driver."""
    out: list[str] = []
    try:
        names = sorted(os.listdir(bus_dir))
    except OSError:
        return out
    for name in names:
        dev = os.path.join(bus_dir, name)
        if os.path.lexists(os.path.join(dev, "driver")):
            continue
        try:
            with open(os.path.join(dev, "modalias")) as f:
                modalias = f.read().strip()
        except OSError:
            continue
        if modalias and accept(dev, modalias) and modalias not in out:
            out.append(modalias)
    return out


def _load_all(
    load: Callable[[str], str | None],
    modaliases: list[str],
    preload: Callable[[list[str]], None] | None,
) -> list[str]:
    if preload is not None and modaliases:
        preload(modaliases)
    errors: list[str] = []
    for modalias in modaliases:
        err = load(modalias)
        if err and err not in errors:
            errors.append(err)
    return errors


def _is_virtio_pci(_dev: str, modalias: str) -> bool:
    return modalias.upper().startswith(f"PCI:V0000{VIRTIO_PCI_VENDOR:04X}")


def _is_virtio_mmio(dev: str, modalias: str) -> bool:
    # virtio_mmio.device= on the cmdline, device tree "virtio,mmio", ACPI LNRO0005.
    return (
        modalias == "platform:virtio-mmio"
        or "virtio,mmio" in modalias
        or modalias.startswith("acpi:LNRO0005:")
        or os.path.basename(dev).startswith("virtio-mmio")
    )

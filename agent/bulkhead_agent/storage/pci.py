"""PCI paths: where the host plugged a device, as a chain of slots from the root bus.

Format (as Kata Containers writes it): ``SS[.F]/SS[.F]/...``, hexadecimal. The first
component is a slot (and function, default 0) on the root bus ``0000:00``; each further one
is a slot on the secondary bus of the bridge (or PCIe root port) named before it. The host
client hot-plugs into root ports at fixed slots, so its disks are at ``10/00``, ``11/00``,
and so on: root port at slot 0x10, device at slot 0 behind it. Bus *numbers* are not part
of the path: the guest kernel numbers buses as it enumerates them, so they are looked up in
sysfs (``<bridge>/pci_bus/<domain:bus>``) one hop at a time.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

ROOT_BUS = "0000:00"
_COMPONENT = re.compile(r"([0-9a-fA-F]{1,2})(?:\.([0-7]))?")
MAX_DEPTH = 8


class PciPath(NamedTuple):
    hops: tuple[tuple[int, int], ...]  # (slot, function) per bus, from the root bus down

    def __str__(self) -> str:
        return "/".join(f"{s:02x}" if f == 0 else f"{s:02x}.{f}" for s, f in self.hops)


def parse(text: str) -> PciPath:
    """``"10/00"`` -> ``PciPath(((0x10, 0), (0, 0)))``; ``ValueError`` saying what is wrong."""
    parts = text.split("/")
    if not text or len(parts) > MAX_DEPTH:
        raise ValueError(f"{text!r} is not a PCI path (SS[.F]/SS[.F]..., 1-{MAX_DEPTH} hops)")
    hops = []
    for part in parts:
        match = _COMPONENT.fullmatch(part)
        if match is None or int(match[1], 16) > 0x1F:
            raise ValueError(
                f"{text!r} is not a PCI path: {part!r} is not a slot 00-1f with an optional "
                ".function 0-7"
            )
        hops.append((int(match[1], 16), int(match[2] or 0)))
    return PciPath(tuple(hops))


class Resolution(NamedTuple):
    device_dir: str | None  # the sysfs directory of the device at the end of the path
    progress: str  # how far the path led, for error messages


def resolve(path: PciPath, sysfs: str = "/sys") -> Resolution:
    """Follow ``path`` through sysfs to the device's directory, if it is there (yet)."""
    bus = ROOT_BUS
    directory = os.path.join(sysfs, "devices", f"pci{ROOT_BUS}")
    if not os.path.isdir(directory):
        return Resolution(None, f"no root bus {ROOT_BUS} in {sysfs}/devices")
    for index, (slot, function) in enumerate(path.hops):
        name = f"{bus}:{slot:02x}.{function}"
        device = os.path.join(directory, name)
        if not os.path.isdir(device):
            return Resolution(None, f"no PCI device {name}{_behind(index, directory)}")
        if index == len(path.hops) - 1:
            return Resolution(device, f"PCI device {name}")
        secondary = _secondary_bus(device)
        if secondary is None:
            return Resolution(None, f"{name} has no secondary bus (not a bridge?)")
        bus, directory = secondary, device
    raise AssertionError("unreachable: a PciPath has at least one hop")


def _behind(index: int, directory: str) -> str:
    return "" if index == 0 else f" behind {os.path.basename(directory)}"


def _secondary_bus(device_dir: str) -> str | None:
    try:
        buses = sorted(os.listdir(os.path.join(device_dir, "pci_bus")))
    except OSError:
        return None
    return buses[0] if buses else None


def address_chain(device_dir: str) -> str:
    """``0000:00:10.0/0000:01:00.0`` for a device directory below ``/sys/devices/pci*``."""
    parts = [p for p in device_dir.split("/") if re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:.*", p)]
    return "/".join(parts)


def rescan(sysfs: str = "/sys") -> None:
    """Ask the kernel to enumerate every PCI bus again (finds devices no hot-plug event told it
    about, e.g. behind a bridge without hot-plug support)."""
    with open(os.path.join(sysfs, "bus", "pci", "rescan"), "w") as f:
        f.write("1")

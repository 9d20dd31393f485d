"""Waiting for a disk the host plugged in: kernel uevents plus sysfs, with a deadline.

The waiter subscribes to uevents first and only then looks at sysfs, so a device that is
already there is found at once and one that arrives between the look and the wait still
wakes it. Every uevent (whatever it is about) makes it look again: sysfs is the truth, the
event only says when to read it. If the device is still missing part-way to the deadline
the PCI bus is rescanned once (what finds a device whose hot-plug interrupt was missed, or
one behind a bridge without hot-plug). On timeout the error names what was expected, how
far the PCI path led, and which disks there are.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from . import blockdevs, pci
from .uevent import UeventMonitor, wake_on_events

DEFAULT_TIMEOUT_S = 5.0
RESCAN_AFTER = 0.5  # of the timeout: rescan once half-way


class DeviceTimeout(Exception):
    pass


class Found(NamedTuple):
    disk: str  # name under /sys/block and /dev, e.g. "vdb"
    device_dir: str  # the sysfs directory of the device that was asked for
    waited_s: float


class Lookup(NamedTuple):
    what: str  # "a disk at PCI path 10/00"
    find: Callable[[], tuple[str | None, str, str]]  # -> (disk, device dir, progress)


def by_pci_path(path: pci.PciPath, sysfs: str = "/sys") -> Lookup:
    def find() -> tuple[str | None, str, str]:
        device_dir, progress = pci.resolve(path, sysfs)
        if device_dir is None:
            return None, "", progress
        disk = blockdevs.disk_below(device_dir)
        if disk is None:
            return None, device_dir, f"{progress} is there but has no disk (yet)"
        return disk, device_dir, progress

    return Lookup(f"a disk at PCI path {path}", find)


def by_serial(serial: str, sysfs: str = "/sys") -> Lookup:
    def find() -> tuple[str | None, str, str]:
        disk = blockdevs.disk_with_serial(serial, sysfs)
        if disk is None:
            return None, "", f"no disk has serial {serial!r}"
        return disk, os.path.realpath(os.path.join(sysfs, "block", disk)), ""

    return Lookup(f"a disk with serial {serial!r}", find)


def by_name(name: str, sysfs: str = "/sys") -> Lookup:
    """A disk known by its kernel name (``pmem0``), as for nvdimm namespaces."""

    def find() -> tuple[str | None, str, str]:
        path = os.path.join(sysfs, "block", name)
        if not os.path.exists(path):
            return None, "", f"no /sys/block/{name}"
        return name, os.path.realpath(path), ""

    return Lookup(f"disk {name}", find)


def _ready(disk: str, sysfs: str) -> bool:
    try:
        blockdevs.device_number(disk, sysfs)
    except (OSError, ValueError):
        return False
    return True


async def wait_for_disk(
    lookup: Lookup,
    timeout_s: float,
    uevents: UeventMonitor,
    *,
    sysfs: str = "/sys",
    rescan: Callable[[], None] | None = None,
) -> Found:
    """The disk ``lookup`` finds, as soon as it is there; :class:`DeviceTimeout` after
    ``timeout_s`` seconds."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    deadline = started + timeout_s
    rescan_at = started + timeout_s * RESCAN_AFTER if rescan is not None else None
    wake = asyncio.Event()
    progress = ""
    with uevents.subscribe(wake_on_events(wake)):
        while True:
            wake.clear()
            disk, device_dir, progress = lookup.find()
            if disk is not None:
                # The kernel makes the block directory before its attributes, and the "add"
                # uevent follows them: until "dev" is there, the disk cannot be opened yet.
                if _ready(disk, sysfs):
                    return Found(disk, device_dir, time.monotonic() - started)
                progress = f"{progress}; disk {disk} is there but not ready (no dev number yet)"
            now = time.monotonic()
            if now >= deadline:
                break
            if rescan_at is not None and now >= rescan_at:
                rescan_at = None
                assert rescan is not None
                try:
                    await loop.run_in_executor(None, rescan)
                except OSError:
                    pass  # no rescan file (not PCI): the deadline still applies
                continue
            until = deadline if rescan_at is None else min(deadline, rescan_at)
            try:
                await asyncio.wait_for(wake.wait(), max(0.0, until - now))
            except TimeoutError:
                pass
    raise DeviceTimeout(
        f"timed out after {timeout_s:g} s waiting for {lookup.what}: {progress}; "
        f"disks seen: {blockdevs.inventory(sysfs)}"
    )

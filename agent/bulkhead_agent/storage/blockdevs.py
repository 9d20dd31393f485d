"""Block devices in sysfs: the disk below a PCI device, the disk with a serial, what is there.

Everything takes the sysfs root as an argument, so tests can build a fake tree.
"""

from __future__ import annotations

import os
import stat

from . import pci

# Devices the host does not plug in: never reported as "seen" in error messages.
_VIRTUAL = ("loop", "ram", "zram", "nbd", "dm-", "md")
MAX_WALK_DEPTH = 6  # virtio-pmem: virtioN/ndbusN/regionN/namespaceN.0/block/pmemN


def disk_below(device_dir: str) -> str | None:
    """The whole-disk name (``vdb``, ``sda``, ``pmem0``) of the first disk found below a
    device's sysfs directory, without following symlinks; ``None`` if none is there yet."""
    found: list[str] = []

    def walk(directory: str, depth: int) -> None:
        if depth > MAX_WALK_DEPTH or found:
            return
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name == "block":
                try:
                    disks = sorted(os.listdir(entry.path))
                except OSError:
                    disks = []
                if disks:
                    found.append(disks[0])
                    return
            else:
                walk(entry.path, depth + 1)

    walk(device_dir, 0)
    return found[0] if found else None


def serial_of(name: str, sysfs: str = "/sys") -> str | None:
    """The serial a disk reports: virtio-blk's ``serial`` attribute, or SCSI's."""
    for relative in ("serial", "device/serial"):
        try:
            with open(os.path.join(sysfs, "block", name, relative), "rb") as f:
                return f.read().decode(errors="replace").strip()
        except OSError:
            continue
    return None


def disks(sysfs: str = "/sys") -> list[str]:
    """Every whole disk the host could have plugged in (no loop, ram, ... devices)."""
    try:
        names = sorted(os.listdir(os.path.join(sysfs, "block")))
    except OSError:
        return []
    return [n for n in names if not n.startswith(_VIRTUAL)]


def disk_with_serial(serial: str, sysfs: str = "/sys") -> str | None:
    for name in disks(sysfs):
        if serial_of(name, sysfs) == serial:
            return name
    return None


def describe(name: str, sysfs: str = "/sys") -> str:
    """``vdb at 0000:00:10.0/0000:01:00.0 serial 'data'``, for error messages."""
    real = os.path.realpath(os.path.join(sysfs, "block", name))
    where = pci.address_chain(real)
    serial = serial_of(name, sysfs)
    text = name
    if where:
        text += f" at {where}"
    if serial:
        text += f" serial {serial!r}"
    return text


def inventory(sysfs: str = "/sys") -> str:
    """What disks there are, for an error message: ``vda at ..., vdb at ...`` or ``none``."""
    return ", ".join(describe(n, sysfs) for n in disks(sysfs)) or "none"


def device_number(name: str, sysfs: str = "/sys") -> tuple[int, int]:
    """``(major, minor)`` from ``/sys/block/<name>/dev``."""
    with open(os.path.join(sysfs, "block", name, "dev")) as f:
        major, _, minor = f.read().strip().partition(":")
    return int(major), int(minor)


def device_node(name: str, sysfs: str = "/sys", dev: str = "/dev", fallback_dir: str = "") -> str:
    """The block device node for disk ``name``: ``/dev/<name>`` as devtmpfs made it, checked
    against sysfs' device number; if it is missing (or not that device), a node of our own in
    ``fallback_dir``."""
    major, minor = device_number(name, sysfs)
    path = os.path.join(dev, name)
    try:
        st = os.stat(path)
        if stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (
            major,
            minor,
        ):
            return path
    except FileNotFoundError:
        pass
    if not fallback_dir:
        raise FileNotFoundError(f"{path}: no block device node {major}:{minor}")
    os.makedirs(fallback_dir, 0o700, exist_ok=True)
    own = os.path.join(fallback_dir, name)
    try:
        os.unlink(own)
    except FileNotFoundError:
        pass
    os.mknod(own, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
    return own

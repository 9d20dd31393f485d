"""Hot-plugging devices into a running sandbox VM through QMP.

The VM is started with empty PCIe root ports at fixed slots (``QemuConfig.hotplug_ports``,
``bh-port0`` at slot 0x10, ``bh-port1`` at 0x11, ...). A device goes into a free port at
slot 0 behind it, so the guest finds it at PCI path ``<port slot>/00`` (``10/00``, ...):
predictable before the guest has seen anything, which is what the agent waits for.

Disks: ``blockdev-add`` (the image as a block node) then ``device_add virtio-blk-pci``; out
again with ``device_del``, waiting for QEMU's ``DEVICE_DELETED`` (the guest must let go
first), then ``blockdev-del``. QEMU ids are derived from a name: ``bh-disk-<name>`` for the
device, ``bh-node-<name>`` for its block node, ``bh-fs-<name>`` for a share.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BulkheadError, QemuError
from .qemu import hotplug_pci_path, hotplug_port_id
from .qmp import Qmp

UNPLUG_TIMEOUT = 30.0
VIRTIO_BLK_SERIAL_MAX = 20  # bytes the guest can read back (VIRTIO_BLK_ID_BYTES)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PORT_ID = re.compile(r"bh-port(\d+)")


class HotplugError(BulkheadError):
    """A device could not be plugged in or out (the message says which and why)."""


@dataclass(frozen=True)
class Plugged:
    name: str
    port: int
    pci_path: str  # where the guest finds it
    device_id: str  # QEMU's id of the device
    node: str = ""  # QEMU's block node ("" for devices without one)


def disk_ids(name: str) -> tuple[str, str]:
    """``(device id, block node name)`` for disk ``name``."""
    return f"bh-disk-{name}", f"bh-node-{name}"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise HotplugError(
            f"bad device name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def ports(qmp: Qmp) -> dict[int, list[str]]:
    """Our hot-plug ports: port number -> QEMU ids of what is plugged into it.

    From QOM (each device's ``parent_bus``), not ``query-pci``: that one reports what the
    guest has enumerated, so a device just plugged in, or a VM not yet running, would look
    free.
    """
    peripherals = [
        entry["name"]
        for entry in qmp.execute("qom-list", {"path": "/machine/peripheral"})
        if str(entry.get("type", "")).startswith("child<")
    ]
    found: dict[int, list[str]] = {}
    for name in peripherals:
        match = _PORT_ID.fullmatch(name)
        if match is not None:
            found.setdefault(int(match[1]), [])
    for name in peripherals:
        if _PORT_ID.fullmatch(name):
            continue
        try:
            bus = qmp.execute(
                "qom-get", {"path": f"/machine/peripheral/{name}", "property": "parent_bus"}
            )
        except QemuError:
            continue  # not a bus device (a memory backend, say), or gone meanwhile
        match = _PORT_ID.fullmatch(str(bus).rsplit("/", 1)[-1])
        if match is not None and int(match[1]) in found:
            found[int(match[1])].append(name)
    return found


def free_port(qmp: Qmp) -> int:
    available = ports(qmp)
    if not available:
        raise HotplugError(
            "this sandbox has no hot-plug ports: boot it with hotplug_ports=N "
            "(bulkhead sandbox up --hotplug-ports N)"
        )
    for port in sorted(available):
        if not available[port]:
            return port
    raise HotplugError(
        f"all {len(available)} hot-plug ports of this sandbox are in use: remove a device, or "
        "boot it with more (hotplug_ports)"
    )


def plug_disk(
    qmp: Qmp,
    image: str | os.PathLike[str],
    name: str,
    *,
    readonly: bool = False,
    serial: str | None = None,
    image_format: str = "raw",
) -> Plugged:
    """Plug ``image`` in as a virtio-blk disk in a free port; where the guest will find it."""
    check_name(name)
    path = Path(image).resolve()
    if not path.is_file() and not path.is_block_device():
        raise HotplugError(f"disk image {image}: not a file or block device")
    if serial is not None and len(serial.encode()) > VIRTIO_BLK_SERIAL_MAX:
        raise HotplugError(f"serial {serial!r}: at most {VIRTIO_BLK_SERIAL_MAX} bytes")
    device_id, node = disk_ids(name)
    port = free_port(qmp)
    try:
        qmp.execute(
            "blockdev-add",
            {
                "driver": image_format,
                "node-name": node,
                "read-only": readonly,
                "file": {"driver": "file", "filename": str(path), "read-only": readonly},
            },
        )
    except QemuError as exc:
        raise HotplugError(f"disk {name}: QEMU cannot open {path}: {_cause(exc)}") from exc
    arguments: dict[str, Any] = {
        "driver": "virtio-blk-pci",
        "id": device_id,
        "drive": node,
        "bus": hotplug_port_id(port),
        "addr": "0",
    }
    if serial:
        arguments["serial"] = serial
    try:
        qmp.execute("device_add", arguments)
    except QemuError as exc:
        _quietly(qmp, "blockdev-del", {"node-name": node})
        raise HotplugError(f"disk {name}: device_add failed: {_cause(exc)}") from exc
    return Plugged(name, port, hotplug_pci_path(port), device_id, node)


def unplug_disk(qmp: Qmp, name: str, *, timeout: float = UNPLUG_TIMEOUT) -> None:
    """Take disk ``name`` out: ``device_del``, wait for ``DEVICE_DELETED``, ``blockdev-del``."""
    device_id, node = disk_ids(name)
    unplug(qmp, device_id, timeout=timeout)
    try:
        qmp.execute("blockdev-del", {"node-name": node})
    except QemuError as exc:
        raise HotplugError(f"disk {name}: blockdev-del failed: {_cause(exc)}") from exc


def unplug(qmp: Qmp, device_id: str, *, timeout: float = UNPLUG_TIMEOUT) -> None:
    """``device_del`` and wait until QEMU reports the device gone."""
    try:
        qmp.execute_until_event(
            "device_del", {"id": device_id}, "DEVICE_DELETED", {"device": device_id},
            timeout=timeout,
        )  # fmt: skip
    except QemuError as exc:
        if "not found" in str(exc.__cause__ or exc):
            raise HotplugError(f"no device {device_id} is plugged in") from exc
        raise HotplugError(
            f"{device_id} was not released within {timeout:g}s (is the guest using it?): "
            f"{_cause(exc)}"
        ) from exc


def _quietly(qmp: Qmp, command: str, arguments: dict[str, Any]) -> None:
    try:
        qmp.execute(command, arguments)
    except QemuError:
        pass


def _cause(exc: QemuError) -> str:
    return str(exc.__cause__ or exc)

"""Storage comings and goings as agent events (``events.log``): ``device_added`` and
``storage_mounted`` when a storage is added (the first only for one with a device),
``device_removed`` when a device-backed storage is unmounted (the host may unplug it then)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..events import log as kinds
from .manager import StorageObserver

if TYPE_CHECKING:
    from ..events.log import EventLog
    from .model import Storage


class StorageEvents(StorageObserver):
    def __init__(self, log: EventLog) -> None:
        self.log = log

    def added(self, storage: Storage) -> None:
        details = {"storage_id": storage.id, "driver": storage.driver}
        if storage.device_path:
            waited = {"device_wait_ms": f"{storage.device_wait_ms:.1f}"}
            self.log.emit(
                kinds.DEVICE_ADDED,
                device=storage.source,
                details={**details, "sysfs": storage.device_path, **waited},
            )
        self.log.emit(
            kinds.STORAGE_MOUNTED,
            device=storage.source,
            mount_point=storage.mount_point,
            details={**details, "fstype": storage.fstype, "read_only": str(storage.read_only)},
        )

    def removed(self, storage: Storage) -> None:
        if storage.device_path:
            self.log.emit(
                kinds.DEVICE_REMOVED,
                device=storage.source,
                mount_point=storage.mount_point,
                details={"storage_id": storage.id, "driver": storage.driver},
            )

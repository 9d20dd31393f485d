"""What a storage request asks for, and what the agent keeps about a mounted storage.

Plain data, no protobuf: ``services.storage`` converts, so the logic is testable natively.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLOCK = "block"
VIRTIO_FS = "virtio-fs"
NINE_P = "9p"
PMEM = "pmem"
TMPFS = "tmpfs"
LOCAL = "local"
OVERLAY = "overlay"
DRIVERS = (BLOCK, VIRTIO_FS, NINE_P, PMEM, TMPFS, LOCAL, OVERLAY)


@dataclass(frozen=True)
class StorageRequest:
    storage_id: str
    driver: str
    pci_path: str = ""
    serial: str = ""
    device: str = ""
    tag: str = ""
    fstype: str = ""
    options: tuple[str, ...] = ()
    mount_point: str = ""  # relative to the storage directory; "" means storage_id
    timeout_s: float = 0.0  # 0: the default
    lowers: tuple[str, ...] = ()
    upper: str = ""
    dax: bool = False


@dataclass
class Storage:
    id: str
    driver: str
    mount_point: str  # absolute
    relative: tuple[str, ...]  # the mount point's names below the storage directory
    source: str = ""
    fstype: str = ""
    options: tuple[str, ...] = ()
    read_only: bool = False
    owner: str = ""  # the container it was added for
    added_unix: float = 0.0
    device_wait_ms: float = 0.0
    device_path: str = ""
    mounted: bool = False  # something is mounted on mount_point (LOCAL: nothing)
    private_dir: str = ""  # agent-only state to clean up (an overlay's tmpfs)
    uses: tuple[str, ...] = ()  # storages this one is built on (overlay layers)
    users: set[str] = field(default_factory=set)  # container ids, "storage:ID"
    ready: bool = False  # False while it is being added or removed

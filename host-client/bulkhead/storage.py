"""The agent's Storage service as typed calls: storages, file copies, volume statistics.

>>> with Sandbox.get("demo") as sb:                                     # doctest: +SKIP
...     info = sb.storage.add("scratch", "tmpfs", options=["size=64m"])
...     sb.storage.copy_file("app.conf", "scratch", "etc/app.conf", mode=0o600)
...     print(sb.storage.volume_stats("scratch").used_bytes)
...     sb.storage.remove("scratch")

Disks are plugged in by the host first (``Sandbox.add_disk`` does both). A container uses a
storage as its root (``rootfs_storage="ID[/sub]"``) or as a volume (an OCI mount whose source
is ``storage:ID[/sub]``, see :func:`volume`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import grpc

from bulkhead_proto.v1 import storage_pb2, storage_pb2_grpc

from .client import call
from .errors import BulkheadError

pb = storage_pb2
CHUNK = 1024 * 1024  # the agent takes up to 1 MiB per message
DRIVERS = {
    "block": pb.StorageSpec.BLOCK,
    "virtio-fs": pb.StorageSpec.VIRTIO_FS,
    "9p": pb.StorageSpec.NINE_P,
    "pmem": pb.StorageSpec.PMEM,
    "tmpfs": pb.StorageSpec.TMPFS,
    "local": pb.StorageSpec.LOCAL,
    "overlay": pb.StorageSpec.OVERLAY,
}
_DRIVER_NAMES = {number: name for name, number in DRIVERS.items()}


@dataclass(frozen=True)
class StorageInfo:
    storage_id: str
    driver: str
    mount_point: str
    source: str
    fstype: str
    options: tuple[str, ...]
    read_only: bool
    users: tuple[str, ...]
    owner: str
    added_unix: float
    device_wait_ms: float
    device_path: str
    # Set by Sandbox.add_disk: from QMP device_add to the agent's reply (mounted).
    hotplug_seconds: float | None = field(default=None, compare=False)

    @classmethod
    def from_proto(cls, msg: pb.StorageInfo) -> StorageInfo:
        return cls(
            storage_id=msg.storage_id,
            driver=_DRIVER_NAMES.get(msg.driver, str(msg.driver)),
            mount_point=msg.mount_point,
            source=msg.source,
            fstype=msg.fstype,
            options=tuple(msg.options),
            read_only=msg.read_only,
            users=tuple(msg.users),
            owner=msg.owner,
            added_unix=msg.added_unix,
            device_wait_ms=msg.device_wait_ms,
            device_path=msg.device_path,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "storage_id": self.storage_id,
            "driver": self.driver,
            "mount_point": self.mount_point,
            "source": self.source,
            "fstype": self.fstype,
            "options": list(self.options),
            "read_only": self.read_only,
            "users": list(self.users),
            "owner": self.owner,
            "added_unix": self.added_unix,
            "device_wait_ms": self.device_wait_ms,
            "device_path": self.device_path,
            "hotplug_seconds": self.hotplug_seconds,
        }


@dataclass(frozen=True)
class VolumeStats:
    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    inodes: int
    inodes_used: int
    inodes_free: int
    read_only: bool

    @classmethod
    def from_proto(cls, msg: pb.VolumeStats) -> VolumeStats:
        return cls(
            msg.capacity_bytes,
            msg.used_bytes,
            msg.available_bytes,
            msg.inodes,
            msg.inodes_used,
            msg.inodes_free,
            msg.read_only,
        )


def storage_spec(
    storage_id: str,
    driver: str,
    *,
    pci_path: str = "",
    serial: str = "",
    device: str = "",
    tag: str = "",
    fstype: str = "",
    options: Iterable[str] = (),
    mount_point: str = "",
    timeout: float | None = None,
    lowers: Iterable[str] = (),
    upper: str = "",
    dax: bool = False,
) -> pb.StorageSpec:
    """The ``StorageSpec`` message (also what ``create_container(storages=...)`` takes)."""
    if driver not in DRIVERS:
        raise BulkheadError(f"unknown storage driver {driver!r}: one of {', '.join(DRIVERS)}")
    return pb.StorageSpec(
        storage_id=storage_id,
        driver=DRIVERS[driver],
        pci_path=pci_path,
        serial=serial,
        device=device,
        tag=tag,
        fstype=fstype,
        options=list(options),
        mount_point=mount_point,
        timeout_ms=0 if timeout is None else max(1, round(timeout * 1000)),
        lowers=list(lowers),
        upper=upper,
        dax=dax,
    )


def volume(storage: str, destination: str, *, readonly: bool = False) -> dict[str, Any]:
    """An OCI mount of storage ``"ID[/sub/dir]"`` at ``destination`` in the container."""
    if not destination.startswith("/"):
        raise BulkheadError(f"a volume's destination must be absolute, not {destination!r}")
    options = ["rbind", "ro" if readonly else "rw"]
    return {"destination": destination, "type": "bind", "source": f"storage:{storage}",
            "options": options}  # fmt: skip


class StorageClient:
    """The ``bulkhead.v1.Storage`` service on an agent's channel (see ``AgentClient.channel``)."""

    def __init__(self, channel: grpc.Channel, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._stub = storage_pb2_grpc.StorageStub(channel)

    def add(
        self, storage_id: str, driver: str, *, rpc_timeout: float | None = None, **spec: Any
    ) -> StorageInfo:
        """Add (mount) a storage; ``spec`` as :func:`storage_spec`. The call waits up to the
        device ``timeout`` plus the client's default."""
        message = storage_spec(storage_id, driver, **spec)
        wait = message.timeout_ms / 1000 if message.timeout_ms else 5.0
        reply = self._call(
            "AddStorage", self._stub.AddStorage, message, rpc_timeout or wait + self.timeout
        )
        return StorageInfo.from_proto(reply)

    def add_spec(self, message: pb.StorageSpec, *, timeout: float | None = None) -> StorageInfo:
        reply = self._call("AddStorage", self._stub.AddStorage, message, timeout)
        return StorageInfo.from_proto(reply)

    def remove(self, storage_id: str, *, timeout: float | None = None) -> None:
        """Unmount and forget it (``FailedPrecondition`` while a container uses it)."""
        self._call(
            "RemoveStorage",
            self._stub.RemoveStorage,
            pb.RemoveStorageRequest(storage_id=storage_id),
            timeout,
        )

    def list(self, *, timeout: float | None = None) -> list[StorageInfo]:
        reply = self._call(
            "ListStorages", self._stub.ListStorages, pb.ListStoragesRequest(), timeout
        )
        return [StorageInfo.from_proto(s) for s in reply.storages]

    def volume_stats(
        self, storage_id: str, path: str = "", *, timeout: float | None = None
    ) -> VolumeStats:
        reply = self._call(
            "GetVolumeStats",
            self._stub.GetVolumeStats,
            pb.VolumeStatsRequest(storage_id=storage_id, path=path),
            timeout,
        )
        return VolumeStats.from_proto(reply)

    def copy_file(
        self,
        source: str | os.PathLike[str] | bytes | IO[bytes],
        storage_id: str,
        path: str,
        *,
        mode: int | None = None,
        uid: int = 0,
        gid: int = 0,
        make_parents: bool = False,
        size: int | None = None,
        chunk: int = CHUNK,
        timeout: float | None = math.inf,
    ) -> str:
        """Copy a host file (a path, bytes, or a binary file object with ``size``) to ``path``
        in storage ``storage_id`` (``""``: the agent's file area); the guest path it got.

        It appears there whole or not at all. ``mode`` defaults to the host file's
        permission bits (0644 for bytes and file objects).
        """
        handle: IO[bytes] | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            size = len(data)
            chunks: Iterator[bytes] = (data[i : i + chunk] for i in range(0, len(data), chunk))
            mode = 0o644 if mode is None else mode
        elif isinstance(source, str | os.PathLike):
            handle = open(source, "rb")  # noqa: SIM115 - closed below, after the stream
            st = os.fstat(handle.fileno())
            size = st.st_size
            mode = (st.st_mode & 0o7777) if mode is None else mode
            chunks = iter(lambda: handle.read(chunk), b"")  # type: ignore[union-attr]
        else:
            if size is None:
                raise BulkheadError("copy_file from a file object needs its size")
            stream = source
            chunks = iter(lambda: stream.read(chunk), b"")
            mode = 0o644 if mode is None else mode

        def messages() -> Iterator[pb.CopyFileRequest]:
            yield pb.CopyFileRequest(
                storage_id=storage_id, path=path, mode=mode, uid=uid, gid=gid,
                size=size, make_parents=make_parents,
            )  # fmt: skip
            for data in chunks:
                yield pb.CopyFileRequest(data=data)

        try:
            reply = self._call("CopyFile", self._stub.CopyFile, messages(), timeout)
        finally:
            if handle is not None:
                handle.close()
        return reply.path

    def _call(self, method: str, rpc: Any, request: Any, timeout: float | None) -> Any:
        timeout = self.timeout if timeout is None else timeout
        return call(f"bulkhead.v1.Storage/{method}", rpc, request, timeout)

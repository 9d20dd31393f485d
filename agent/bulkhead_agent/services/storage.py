"""The ``bulkhead.v1.Storage`` servicer, and the storage side of CreateContainer and
RemoveContainer (``create_container`` / ``remove_container``, called by the container RPCs).

Each handler converts between protocol messages and ``storage.manager.StorageManager``;
failures (``containers.errors.Failure``) become the status they name.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from bulkhead_agent.containers.errors import Failure, check_id
from bulkhead_agent.containers.manager import Manager
from bulkhead_agent.storage import model
from bulkhead_agent.storage.files import FileCopy
from bulkhead_agent.storage.manager import StorageManager
from bulkhead_agent.storage.model import Storage, StorageRequest
from bulkhead_agent.storage.volumes import bind_storages
from bulkhead_proto.v1 import storage_pb2, storage_pb2_grpc

T = TypeVar("T")
pb = storage_pb2
MAX_CHUNK = 1024 * 1024 + 4096  # a 1 MiB chunk and the header's fields

_DRIVERS = {
    pb.StorageSpec.BLOCK: model.BLOCK,
    pb.StorageSpec.VIRTIO_FS: model.VIRTIO_FS,
    pb.StorageSpec.NINE_P: model.NINE_P,
    pb.StorageSpec.PMEM: model.PMEM,
    pb.StorageSpec.TMPFS: model.TMPFS,
    pb.StorageSpec.LOCAL: model.LOCAL,
    pb.StorageSpec.OVERLAY: model.OVERLAY,
}
_DRIVER_ENUMS = {name: number for number, name in _DRIVERS.items()}


def request_from_proto(spec: pb.StorageSpec) -> StorageRequest:
    driver = _DRIVERS.get(spec.driver)
    if driver is None:
        raise Failure("INVALID_ARGUMENT", f"driver: {spec.driver} is not a known driver")
    return StorageRequest(
        storage_id=spec.storage_id,
        driver=driver,
        pci_path=spec.pci_path,
        serial=spec.serial,
        device=spec.device,
        tag=spec.tag,
        fstype=spec.fstype,
        options=tuple(spec.options),
        mount_point=spec.mount_point,
        timeout_s=spec.timeout_ms / 1000,
        lowers=tuple(spec.lowers),
        upper=spec.upper,
        dax=spec.dax,
    )


def info_message(storage: Storage) -> pb.StorageInfo:
    return pb.StorageInfo(
        storage_id=storage.id,
        driver=_DRIVER_ENUMS[storage.driver],  # type: ignore[arg-type]
        mount_point=storage.mount_point,
        source=storage.source,
        fstype=storage.fstype,
        options=storage.options,
        read_only=storage.read_only,
        users=sorted(storage.users),
        owner=storage.owner,
        added_unix=storage.added_unix,
        device_wait_ms=storage.device_wait_ms,
        device_path=storage.device_path,
    )


async def _call(context: grpc.aio.ServicerContext, work: Awaitable[T], shield: bool = False) -> T:
    try:
        if shield:
            return await asyncio.shield(work)
        return await work
    except Failure as exc:
        await context.abort(grpc.StatusCode[exc.code], exc.message)
        raise
    except OSError as exc:  # one the steps did not foresee: say what, not "Unexpected <class>"
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        raise


async def _now(fn, *args):  # type: ignore[no-untyped-def]
    return fn(*args)


class StorageService(storage_pb2_grpc.StorageServicer):
    def __init__(self, storages: StorageManager) -> None:
        self._storages = storages

    async def AddStorage(
        self, request: pb.StorageSpec, context: grpc.aio.ServicerContext
    ) -> pb.StorageInfo:
        async def work() -> Storage:
            return await self._storages.add(request_from_proto(request))

        # Shielded: a host that gives up half-way gets a storage fully added or not at all.
        return info_message(await _call(context, work(), shield=True))

    async def RemoveStorage(
        self, request: pb.RemoveStorageRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveStorageResponse:
        await _call(context, self._storages.remove(request.storage_id), shield=True)
        return pb.RemoveStorageResponse()

    async def ListStorages(
        self, request: pb.ListStoragesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStoragesResponse:
        return pb.ListStoragesResponse(storages=[info_message(s) for s in self._storages.list()])

    async def GetVolumeStats(
        self, request: pb.VolumeStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.VolumeStats:
        work = _now(self._storages.stats, request.storage_id, request.path)
        stats = await _call(context, work)
        return pb.VolumeStats(**stats._asdict())

    async def CopyFile(
        self, request_iterator: AsyncIterator[pb.CopyFileRequest], context: grpc.aio.ServicerContext
    ) -> pb.CopyFileResponse:
        return await _call(context, self._copy(request_iterator))

    async def _copy(self, requests: AsyncIterator[pb.CopyFileRequest]) -> pb.CopyFileResponse:
        copy: FileCopy | None = None
        try:
            async for message in requests:
                if copy is None:
                    root, read_only = self._storages.root_for_copy(message.storage_id)
                    if read_only:
                        raise Failure(
                            "FAILED_PRECONDITION",
                            f"storage_id: storage {message.storage_id!r} is read-only",
                        )
                    copy = FileCopy(
                        root,
                        message.path,
                        size=message.size,
                        mode=message.mode,
                        uid=message.uid,
                        gid=message.gid,
                        make_parents=message.make_parents,
                    )
                if message.data:
                    copy.write(message.data)
            if copy is None:
                raise Failure("INVALID_ARGUMENT", "the stream carried no header")
            path = await copy.finish()
            written = copy.written
            copy = None
            return pb.CopyFileResponse(bytes_written=written, path=path)
        except OSError as exc:
            code = "RESOURCE_EXHAUSTED" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
            name = errno.errorcode.get(exc.errno or 0, "?")
            raise Failure(code or "FAILED_PRECONDITION", f"copy: {exc.strerror} ({name})") from None
        finally:
            if copy is not None:
                copy.abort()


# --- CreateContainer and RemoveContainer with storages ----------------------------------------


async def create_container(
    storages: StorageManager | None,
    containers: Manager,
    container_id: str,
    oci_spec: bytes,
    bundle_dir: str,
    rootfs_storage: str = "",
    requests: list[pb.StorageSpec] | None = None,
) -> int:
    """Add the container's own storages, resolve its storage references, create it; on
    failure, every storage it added is removed again and nothing stays in use."""
    if storages is None:
        if rootfs_storage or requests:
            raise Failure("UNAVAILABLE", "storage is not available in this agent")
        return await containers.create(container_id, oci_spec, bundle_dir)
    check_id(container_id, "container_id")
    if container_id in {c.container_id for c in containers.list()}:
        raise Failure("ALREADY_EXISTS", f"container {container_id!r} exists")
    await storages.add_for_container(container_id, [request_from_proto(r) for r in requests or []])
    try:
        spec, used = bind_storages(storages, oci_spec, rootfs_storage)
        storages.use(container_id, used)
        return await containers.create(container_id, spec, bundle_dir)
    except BaseException:
        await storages.release(container_id)
        raise


async def remove_container(
    storages: StorageManager | None, containers: Manager, container_id: str, timeout_ms: int
) -> None:
    """Remove the container; once it is gone, its storages are free (and its own removed)."""
    try:
        await containers.remove(container_id, timeout_ms)
    finally:
        gone = container_id not in {c.container_id for c in containers.list()}
        if storages is not None and gone:
            await storages.release(container_id)

"""The storages the agent has mounted: add, remove, list, statistics, and who uses them.

Layout (``<run dir>`` is ``/run/bulkhead``):

- ``<run dir>/storage/`` holds every mount point (``<id>`` unless the request names another
  relative path). It is bound onto itself and made a *shared* mount, as the containers'
  directory is (see ``containers.rootfs``): containers' mount namespaces hold slave copies,
  so an unmount here leaves none of them behind holding a disk.
- ``<run dir>/storage-private/`` holds what no container may see: overlay tmpfs layers,
  device nodes made when devtmpfs has none.
- ``<run dir>/files/`` is the file area CopyFile writes to when no storage is named.

A storage is in use while a container or an overlay storage refers to it; removing it is
then refused (FAILED_PRECONDITION). Every failure is a :class:`StorageFailure` carrying a
gRPC status name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import NamedTuple

from ..containers import rootfs
from ..containers.errors import check_id
from . import confine, devices, drivers
from .drivers import StorageFailure
from .model import LOCAL, Storage, StorageRequest
from .uevent import UeventMonitor

TYPE_CHECKING = False
if TYPE_CHECKING:
    from bulkhead_init.log import Logger

STORAGE_PREFIX = "storage:"  # users that are storages (overlays), and OCI mount sources


class VolumeStats(NamedTuple):
    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    inodes: int
    inodes_used: int
    inodes_free: int
    read_only: bool


class StorageObserver:
    """Told of storages as they come and go (events); this one ignores them."""

    def added(self, storage: Storage) -> None: ...

    def removed(self, storage: Storage) -> None: ...


class StorageManager:
    def __init__(
        self,
        run_dir: str,
        log: Logger,
        *,
        uevents: UeventMonitor | None = None,
        sysfs: str = "/sys",
        dev: str = "/dev",
        default_timeout_s: float = devices.DEFAULT_TIMEOUT_S,
    ) -> None:
        self.storage_dir = os.path.join(run_dir, "storage")
        self.private_dir = os.path.join(run_dir, "storage-private")
        self.files_dir = os.path.join(run_dir, "files")
        self._log = log
        self._uevents = uevents or UeventMonitor()
        self._storages: dict[str, Storage] = {}
        self._container_uses: dict[str, set[str]] = {}
        self._owned: dict[str, list[str]] = {}  # container id -> storages added for it
        self.observer = StorageObserver()
        self._ctx = drivers.Context(
            uevents=self._uevents,
            private_dir=self.private_dir,
            resolve_ref=self._resolve_layer,
            sysfs=sysfs,
            dev=dev,
            default_timeout_s=default_timeout_s,
        )

    # --- life of the agent -----------------------------------------------------------------

    def prepare(self) -> None:
        rootfs.prepare_base(self.storage_dir)
        os.makedirs(self.private_dir, 0o700, exist_ok=True)
        os.makedirs(self.files_dir, 0o700, exist_ok=True)

    async def shutdown(self) -> None:
        """Unmount everything (newest first: overlays before their layers)."""
        for storage in reversed(list(self._storages.values())):
            storage.users.clear()
            try:
                await self.remove(storage.id)
            except StorageFailure as exc:
                self._log.warning(f"stopping: storage {storage.id}: {exc.message}")
        self._uevents.close()
        with contextlib.suppress(OSError):
            rootfs.release_base(self.storage_dir)

    # --- add -------------------------------------------------------------------------------

    async def add(self, req: StorageRequest, owner: str = "") -> Storage:
        check_id(req.storage_id, "storage_id")
        drivers.validate(req)
        try:
            names = confine.components(req.mount_point or req.storage_id, "mount_point")
        except confine.PathRefused as exc:
            raise StorageFailure("INVALID_ARGUMENT", str(exc)) from None
        if req.storage_id in self._storages:
            raise StorageFailure("ALREADY_EXISTS", f"storage {req.storage_id!r} exists")
        for other in self._storages.values():
            if (
                other.relative == tuple(names[: len(other.relative)])
                or tuple(names) == other.relative[: len(names)]
            ):
                raise StorageFailure(
                    "FAILED_PRECONDITION",
                    f"mount_point: {'/'.join(names)!r} overlaps storage {other.id!r} "
                    f"(at {'/'.join(other.relative)!r})",
                )
        uses = tuple(dict.fromkeys(self._ref_id(ref) for ref in (*req.lowers, req.upper) if ref))
        for used in uses:
            self._get(used, "lowers/upper")
        storage = Storage(
            id=req.storage_id,
            driver=req.driver,
            mount_point=os.path.join(self.storage_dir, *names),
            relative=tuple(names),
            options=req.options,
            owner=owner,
            uses=uses,
        )
        self._storages[req.storage_id] = storage  # reserves the id and the place
        try:
            await self._mount(req, storage, names)
        except BaseException:
            del self._storages[req.storage_id]
            raise
        for used in uses:
            self._storages[used].users.add(STORAGE_PREFIX + storage.id)
        storage.added_unix = time.time()
        storage.ready = True
        self._log.info(
            f"storage {storage.id}: {storage.driver} {storage.source or '-'} "
            f"({storage.fstype or '-'}{', ro' if storage.read_only else ''}) on "
            f"{storage.mount_point}"
            + (f", device after {storage.device_wait_ms:.0f} ms" if storage.device_path else "")
        )
        self.observer.added(storage)
        return storage

    async def _mount(self, req: StorageRequest, storage: Storage, names: list[str]) -> None:
        base = os.open(self.storage_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        parent = target = -1
        made = False
        try:
            try:
                parent = confine.open_dir(
                    base, names[:-1], resolve=confine.STRICT, create=True, field="mount_point"
                )
                os.mkdir(names[-1], 0o755, dir_fd=parent)
                made = True
                target = confine.openat2(
                    parent, names[-1], os.O_RDONLY | os.O_DIRECTORY, resolve=confine.STRICT
                )
            except confine.PathRefused as exc:
                raise StorageFailure("INVALID_ARGUMENT", str(exc)) from None
            except FileExistsError:
                raise StorageFailure(
                    "FAILED_PRECONDITION",
                    f"mount_point: {'/'.join(names)!r} exists already; storages are mounted on "
                    "new directories only",
                ) from None
            mounted = await drivers.mount(req, target, self._ctx)
            storage.source = mounted.source
            storage.fstype = mounted.fstype
            storage.read_only = mounted.read_only
            storage.device_wait_ms = mounted.device_wait_ms
            storage.device_path = mounted.device_path
            storage.mounted = mounted.mounted
            storage.private_dir = mounted.private_dir
        except BaseException:
            if made and parent >= 0:
                with contextlib.suppress(OSError):
                    os.rmdir(names[-1], dir_fd=parent)
                self._prune(names[:-1])
            raise
        finally:
            for fd in (target, parent, base):
                if fd >= 0:
                    os.close(fd)

    def _prune(self, names: list[str] | tuple[str, ...]) -> None:
        """Remove the empty directories the agent made for a nested mount point."""
        for depth in range(len(names), 0, -1):
            try:
                os.rmdir(os.path.join(self.storage_dir, *names[:depth]))
            except OSError:
                return

    # --- remove ----------------------------------------------------------------------------

    async def remove(self, storage_id: str) -> None:
        storage = self._get(storage_id)
        if storage.users:
            raise StorageFailure(
                "FAILED_PRECONDITION",
                f"storage {storage_id!r} is in use by {', '.join(sorted(storage.users))}",
            )
        storage.ready = False
        try:
            if storage.mounted:
                drivers.unmount_all(storage.mount_point)
                os.rmdir(storage.mount_point)
            elif storage.driver == LOCAL:
                shutil.rmtree(storage.mount_point)
            if storage.private_dir:
                drivers.release_private(storage.private_dir)
        except OSError as exc:
            storage.ready = True
            raise StorageFailure(
                "FAILED_PRECONDITION", f"storage {storage_id!r}: cannot remove it: {exc}"
            ) from None
        self._prune(storage.relative[:-1])
        for used in storage.uses:
            other = self._storages.get(used)
            if other is not None:
                other.users.discard(STORAGE_PREFIX + storage_id)
        del self._storages[storage_id]
        self._log.info(f"storage {storage_id}: removed")
        self.observer.removed(storage)

    # --- lookups ---------------------------------------------------------------------------

    def _get(self, storage_id: str, field: str = "storage_id") -> Storage:
        storage = self._storages.get(storage_id)
        if storage is None or not storage.ready:
            raise StorageFailure("NOT_FOUND", f"{field}: no storage {storage_id!r}")
        return storage

    def get(self, storage_id: str) -> Storage:
        return self._get(storage_id)

    def list(self) -> list[Storage]:
        return [s for s in self._storages.values() if s.ready]

    @staticmethod
    def _ref_id(ref: str) -> str:
        return ref.split("/", 1)[0]

    def resolve(self, ref: str, field: str, *, directory: bool = True) -> tuple[Storage, str]:
        """``ID[/sub/path]`` -> the storage and the absolute path it names, confined to it."""
        storage_id, _, sub = ref.partition("/")
        storage = self._get(storage_id, field)
        try:
            names = confine.components(sub, field, allow_empty=True)
        except confine.PathRefused as exc:
            raise StorageFailure("INVALID_ARGUMENT", str(exc)) from None
        if not names:
            return storage, storage.mount_point
        root = os.open(storage.mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            flags = os.O_PATH | (os.O_DIRECTORY if directory else 0)
            fd = confine.openat2(root, "/".join(names), flags, resolve=confine.BENEATH)
        except OSError as exc:
            failure = confine._refusal(exc, field, ref)
            if isinstance(failure, confine.PathRefused):
                raise StorageFailure("INVALID_ARGUMENT", str(failure)) from None
            raise StorageFailure(
                "FAILED_PRECONDITION", f"{field}: {ref!r}: {exc.strerror}"
            ) from None
        finally:
            os.close(root)
        try:
            return storage, confine.real_path(fd)
        finally:
            os.close(fd)

    def _resolve_layer(self, ref: str, field: str) -> str:
        return self.resolve(ref, field)[1]

    def stats(self, storage_id: str, path: str = "") -> VolumeStats:
        storage = self._get(storage_id)
        where = self.resolve(f"{storage_id}/{path}", "path")[1] if path else storage.mount_point
        st = os.statvfs(where)
        size = st.f_frsize
        return VolumeStats(
            capacity_bytes=st.f_blocks * size,
            used_bytes=(st.f_blocks - st.f_bfree) * size,
            available_bytes=st.f_bavail * size,
            inodes=st.f_files,
            inodes_used=st.f_files - st.f_ffree,
            inodes_free=st.f_ffree,
            read_only=bool(st.f_flag & os.ST_RDONLY) or storage.read_only,
        )

    def root_for_copy(self, storage_id: str) -> tuple[str, bool]:
        """The directory CopyFile writes below, and whether it is read-only."""
        if not storage_id:
            return self.files_dir, False
        storage = self._get(storage_id)
        return storage.mount_point, storage.read_only

    # --- containers ------------------------------------------------------------------------

    async def add_for_container(self, container_id: str, requests: list[StorageRequest]) -> None:
        """Add the storages a CreateContainer brought along; all or none."""
        added: list[str] = []
        try:
            for req in requests:
                await self.add(req, owner=container_id)
                added.append(req.storage_id)
        except BaseException:
            for storage_id in reversed(added):
                with contextlib.suppress(StorageFailure):
                    await self.remove(storage_id)
            raise
        self._owned[container_id] = added

    def use(self, container_id: str, storage_ids: set[str]) -> None:
        for storage_id in storage_ids:
            self._get(storage_id)
        for storage_id in storage_ids:
            self._storages[storage_id].users.add(container_id)
        self._container_uses.setdefault(container_id, set()).update(storage_ids)

    async def release(self, container_id: str) -> None:
        """The container is gone: its uses end, and the storages added for it go too."""
        for storage_id in self._container_uses.pop(container_id, set()):
            storage = self._storages.get(storage_id)
            if storage is not None:
                storage.users.discard(container_id)
        for storage_id in reversed(self._owned.pop(container_id, [])):
            try:
                await self.remove(storage_id)
            except StorageFailure as exc:
                self._log.error(f"container {container_id}: storage {storage_id}: {exc.message}")

"""Mounting one storage on its (already created, confined) mount point, per driver.

Each driver finds its source (waiting for a device where there is one), mounts it on the
mount point through the point's descriptor, and reports what it mounted. Requests were
validated by :func:`validate` before any work; a driver raises ``StorageFailure`` (the
agent's ``Failure``) with a status name and a message that says what to change.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..containers.errors import Failure as StorageFailure
from ..linux import mounts as m
from . import blockdevs, confine, devices, filesystems, pci
from .model import BLOCK, LOCAL, NINE_P, OVERLAY, PMEM, TMPFS, VIRTIO_FS, StorageRequest
from .uevent import UeventMonitor, wake_on_events

NINE_P_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144,cache=mmap"


@dataclass
class Mounted:
    source: str
    fstype: str
    read_only: bool
    device_wait_ms: float = 0.0
    device_path: str = ""
    mounted: bool = True
    private_dir: str = ""


@dataclass
class Context:
    uevents: UeventMonitor
    private_dir: str  # agent-only: device nodes, overlay tmpfs layers
    # "ID[/sub]" -> the absolute directory it names (confined), for overlay layers.
    resolve_ref: Callable[[str, str], str]
    sysfs: str = "/sys"
    dev: str = "/dev"
    default_timeout_s: float = devices.DEFAULT_TIMEOUT_S


def invalid(message: str) -> StorageFailure:
    return StorageFailure("INVALID_ARGUMENT", message)


def validate(req: StorageRequest) -> None:
    """Refuse what no driver could do, before anything is touched."""
    given = {
        "pci_path": req.pci_path,
        "serial": req.serial,
        "device": req.device,
        "tag": req.tag,
        "lowers": req.lowers,
        "upper": req.upper,
    }
    allowed = {
        BLOCK: {"pci_path", "serial", "device"},
        PMEM: {"pci_path", "device"},
        VIRTIO_FS: {"tag"},
        NINE_P: {"tag"},
        TMPFS: set(),
        LOCAL: set(),
        OVERLAY: {"lowers", "upper"},
    }
    if req.driver not in allowed:
        raise invalid(f"driver: unknown driver {req.driver!r}")
    extra = sorted(k for k, v in given.items() if v and k not in allowed[req.driver])
    if extra:
        raise invalid(f"{', '.join(extra)}: not used by the {req.driver} driver")
    if req.driver in (BLOCK, PMEM):
        named = [k for k in ("pci_path", "serial", "device") if given[k]]
        if len(named) != 1:
            choices = " or ".join(sorted(allowed[req.driver]))
            raise invalid(f"{req.driver}: give exactly one of {choices}")
        if req.pci_path:
            try:
                pci.parse(req.pci_path)
            except ValueError as exc:
                raise invalid(f"pci_path: {exc}") from None
        if req.device and ("/" in req.device or req.device in (".", "..")):
            raise invalid(f"device: {req.device!r} must be a name under /dev, e.g. pmem0")
        if req.fstype and req.fstype not in filesystems.DISK_FILESYSTEMS:
            known = ", ".join(sorted(filesystems.DISK_FILESYSTEMS))
            raise invalid(f"fstype: {req.fstype!r} is not one of {known}")
    elif req.fstype:
        raise invalid(f"fstype: not used by the {req.driver} driver")
    if req.driver in (VIRTIO_FS, NINE_P) and not req.tag:
        raise invalid(f"tag: the {req.driver} driver needs the share's mount tag")
    if req.driver == OVERLAY and not req.lowers:
        raise invalid("lowers: an overlay needs at least one lower layer")
    if req.dax and req.driver not in (PMEM, BLOCK, VIRTIO_FS):
        raise invalid(f"dax: not available with the {req.driver} driver")
    if req.timeout_s < 0:
        raise invalid("timeout_ms: must not be negative")


async def mount(req: StorageRequest, target_fd: int, ctx: Context) -> Mounted:
    options = m.parse_mount_options(list(req.options))
    if options.flags & (m.MS_BIND | m.MS_MOVE | m.MS_REMOUNT):
        raise invalid("options: bind, rbind, move and remount are not storage options")
    target = confine.fd_path(target_fd)
    if req.driver in (BLOCK, PMEM):
        return await _mount_disk(req, target, options, ctx)
    if req.driver in (VIRTIO_FS, NINE_P):
        return await _mount_share(req, target, options, ctx)
    if req.driver == TMPFS:
        _mount("tmpfs", target, "tmpfs", options.flags, options.data or "mode=0755")
        return Mounted("tmpfs", "tmpfs", bool(options.flags & m.MS_RDONLY))
    if req.driver == LOCAL:
        return Mounted("", "", bool(options.flags & m.MS_RDONLY), mounted=False)
    if req.driver == OVERLAY:
        return _mount_overlay(req, target, options, ctx)
    raise invalid(f"driver: unknown driver {req.driver!r}")


def _mount(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    try:
        m.mount(source, target, fstype, flags, data or None)
    except OSError as exc:
        raise _mount_failure(exc, source, fstype, flags, data) from None


def _mount_failure(
    exc: OSError, source: str, fstype: str, flags: int, data: str | None
) -> StorageFailure:
    """A mount(2) error turned into a failure that says what to change."""
    what = f"mounting {source} ({fstype})"
    if exc.errno == errno.ENODEV:
        return StorageFailure(
            "FAILED_PRECONDITION", f"{what}: this guest kernel has no {fstype} filesystem"
        )
    if exc.errno in (errno.EROFS, errno.EACCES) and not flags & m.MS_RDONLY:
        return StorageFailure(
            "FAILED_PRECONDITION", f"{what}: the device is read-only; mount it with 'ro'"
        )
    if exc.errno == errno.EINVAL:
        return StorageFailure(
            "INVALID_ARGUMENT",
            f"{what}: the kernel refused it (EINVAL): not a valid {fstype}, or bad "
            f"options {data!r}",
        )
    name = errno.errorcode.get(exc.errno or 0, "?")
    return StorageFailure("FAILED_PRECONDITION", f"{what}: {exc.strerror} ({name})")


async def _mount_disk(
    req: StorageRequest, target: str, options: m.MountOptions, ctx: Context
) -> Mounted:
    if req.pci_path:
        lookup = devices.by_pci_path(pci.parse(req.pci_path), ctx.sysfs)
    elif req.serial:
        lookup = devices.by_serial(req.serial, ctx.sysfs)
    else:
        lookup = devices.by_name(req.device, ctx.sysfs)
    timeout = req.timeout_s or ctx.default_timeout_s
    try:
        found = await devices.wait_for_disk(
            lookup,
            timeout,
            ctx.uevents,
            sysfs=ctx.sysfs,
            rescan=(lambda: pci.rescan(ctx.sysfs)) if req.pci_path else None,
        )
    except devices.DeviceTimeout as exc:
        raise StorageFailure("DEADLINE_EXCEEDED", str(exc)) from None
    node = blockdevs.device_node(
        found.disk, ctx.sysfs, ctx.dev, fallback_dir=os.path.join(ctx.private_dir, "dev")
    )
    fstype = req.fstype or filesystems.detect(node)
    if fstype is None:
        known = ", ".join(sorted(filesystems.DISK_FILESYSTEMS))
        raise StorageFailure(
            "INVALID_ARGUMENT",
            f"{node} ({found.disk}): no filesystem found on it (looked for {known}); "
            "format it, or name fstype",
        )
    flags, data = options.flags, options.data
    if fstype in filesystems.READ_ONLY_FILESYSTEMS:
        flags |= m.MS_RDONLY
    if req.dax:
        if fstype not in filesystems.DAX_FILESYSTEMS:
            raise invalid(f"dax: {fstype} cannot map files directly (DAX)")
        data = ",".join(filter(None, [data, "dax=always" if fstype != "erofs" else "dax"]))
    _mount(node, target, fstype, flags, data)
    return Mounted(
        source=node,
        fstype=fstype,
        read_only=bool(flags & m.MS_RDONLY),
        device_wait_ms=found.waited_s * 1000,
        device_path=found.device_dir,
    )


async def _mount_share(
    req: StorageRequest, target: str, options: m.MountOptions, ctx: Context
) -> Mounted:
    """virtio-fs and 9p: the tag is only known to the kernel's driver (6.1 lists no tags in
    sysfs), so mounting is the lookup: retried on every uevent until the deadline while the
    kernel says no such tag (a share being hot-plugged)."""
    if req.driver == VIRTIO_FS:
        fstype = "virtiofs"
        data = ",".join(filter(None, [options.data, "dax" if req.dax else ""]))
    else:
        fstype = "9p"
        data = ",".join(filter(None, [NINE_P_OPTIONS, options.data]))
    timeout = req.timeout_s or ctx.default_timeout_s
    started = time.monotonic()
    deadline = started + timeout
    wake = asyncio.Event()
    with ctx.uevents.subscribe(wake_on_events(wake)):
        while True:
            wake.clear()
            try:
                m.mount(req.tag, target, fstype, options.flags, data or None)
                break
            except OSError as exc:
                # virtiofs: EINVAL for an unknown tag; 9p: ENOENT. Anything else is final.
                if exc.errno not in (errno.EINVAL, errno.ENOENT):
                    raise _mount_failure(exc, req.tag, fstype, options.flags, data) from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StorageFailure(
                        "DEADLINE_EXCEEDED",
                        f"timed out after {timeout:g} s waiting for a {req.driver} share with "
                        f"tag {req.tag!r}: the kernel knows no such tag ({exc.strerror})",
                    ) from None
                try:
                    await asyncio.wait_for(wake.wait(), remaining)
                except TimeoutError:
                    pass
    return Mounted(
        source=req.tag,
        fstype=fstype,
        read_only=bool(options.flags & m.MS_RDONLY),
        device_wait_ms=(time.monotonic() - started) * 1000,
    )


def _escape(path: str) -> str:
    # overlayfs splits its options at ',' and its layers at ':'; '\\' escapes either.
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _mount_overlay(
    req: StorageRequest, target: str, options: m.MountOptions, ctx: Context
) -> Mounted:
    lowers = [ctx.resolve_ref(ref, "lowers") for ref in req.lowers]
    read_only = bool(options.flags & m.MS_RDONLY)
    layers = [f"lowerdir={':'.join(_escape(p) for p in lowers)}"]
    private = ""
    if req.upper:
        layer_root = ctx.resolve_ref(req.upper, "upper")
    elif read_only:
        layer_root = ""
    else:
        # A tmpfs of its own, outside any storage, holds the writable layer.
        private = _private_tmpfs(ctx, req.storage_id)
        layer_root = private
    if layer_root:
        for name in ("upper", "work"):
            os.makedirs(os.path.join(layer_root, name), 0o755, exist_ok=True)
        layers.append(f"upperdir={_escape(os.path.join(layer_root, 'upper'))}")
        layers.append(f"workdir={_escape(os.path.join(layer_root, 'work'))}")
    data = ",".join(filter(None, [*layers, options.data]))
    try:
        _mount("overlay", target, "overlay", options.flags, data)
    except BaseException:
        if private:
            release_private(private)
        raise
    return Mounted("overlay", "overlay", read_only, private_dir=private)


def _private_tmpfs(ctx: Context, storage_id: str) -> str:
    path = os.path.join(ctx.private_dir, "overlay", storage_id)
    release_private(path)  # whatever a previous agent left under this id
    os.makedirs(path, 0o700)
    m.mount("tmpfs", path, "tmpfs", m.MS_NOSUID | m.MS_NODEV, "mode=0755")
    return path


def release_private(path: str) -> None:
    """Unmount and remove an overlay's private tmpfs; missing is fine."""
    unmount_all(path)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target``; lazily (detached) if it is busy."""
    while True:
        try:
            m.umount2(target, m.UMOUNT_NOFOLLOW)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            if exc.errno != errno.EBUSY:
                raise
            m.umount2(target, m.MNT_DETACH | m.UMOUNT_NOFOLLOW)

"""A container's bind mounts of host paths, carried into the pod's VM.

A spec's ``bind`` mount names a host file or directory (``ctr run --mount``, CRI's
``/etc/hosts``, ``/etc/resolv.conf`` and volumes). The guest cannot see the host, so each one
is bind-mounted, on the host, into one directory per pod that is shared into the VM over
virtio-fs (a single share, so a pod with many volumes needs no more devices): the container's
mount then binds the share's copy of it in the guest. virtiofsd runs with the chroot sandbox in
the host's mount namespace, so it sees bind mounts made under its directory after it started.

``/dev/shm`` is the one exception: CRI binds the pod's host tmpfs there, but memory shared
with the host means nothing to processes in the VM, so the container gets a tmpfs of the
guest's (as Kata does).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from bulkhead_agent.linux import mounts

from .rootfs import unmount_rootfs

log = logging.getLogger(__name__)

SHARE_ID = "pod-mounts"  # the virtio-fs storage of the pod's host mounts
SHM = {
    "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
    "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
}  # fmt: skip


def is_host_bind(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    binding = mount.get("type") == "bind" or "bind" in options or "rbind" in options
    return binding and str(mount.get("source", "")).startswith("/")


def needs_share(spec: dict[str, Any]) -> bool:
    """Whether the spec has host bind mounts to carry (the pod's share must exist first)."""
    return any(
        is_host_bind(m) and m.get("destination") != "/dev/shm" for m in spec.get("mounts") or []
    )


def carry(spec: dict[str, Any], container_id: str, host_dir: Path, guest_dir: str) -> list[str]:
    """Bind each host path of ``spec``'s mounts under ``host_dir`` (the pod's share, seen in
    the guest at ``guest_dir``) and point the mount at it there; ``spec`` is changed in place.
    Returns the host mount points made, for ``release``; on an error those made are undone."""
    made: list[str] = []
    try:
        for n, m in enumerate(spec.get("mounts") or []):
            if not is_host_bind(m):
                continue
            if m.get("destination") == "/dev/shm":
                m.clear()
                m.update(SHM)
                continue
            name = f"{container_id}-{n}"
            target = host_dir / name
            _bind(str(m["source"]), target, m.get("options") or [])
            made.append(str(target))
            m["source"] = f"{guest_dir}/{name}"
    except BaseException:
        release(made)
        raise
    return made


def _bind(source: str, target: Path, options: list[str]) -> None:
    if not os.path.exists(source):
        raise FileNotFoundError(errno.ENOENT, f"bind mount source {source}: no such file")
    if os.path.isdir(source):
        target.mkdir(exist_ok=True)
    else:
        target.touch(exist_ok=True)
    flags = mounts.MS_BIND | (mounts.MS_REC if "rbind" in options else 0)
    mounts.mount(source, str(target), None, flags)
    if "ro" in options:
        # A bind mount takes MS_RDONLY only on a remount; the host copy must be read-only too,
        # or the guest could write through virtio-fs what its own mount forbids.
        ro = mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY | mounts.mount_flags_of(source)
        mounts.mount(None, str(target), None, ro)


def release(targets: list[str]) -> None:
    """Unmount what ``carry`` made (lazily: the guest may still hold it open) and remove the
    mount points. Never a recursive removal: through a mount it would delete host files."""
    for target in targets:
        try:
            unmount_rootfs(target)
        except OSError as exc:
            log.warning("unmounting %s: %s", target, exc)
        with contextlib.suppress(OSError):
            if os.path.isdir(target) and not os.path.islink(target):
                os.rmdir(target)
            else:
                os.unlink(target)


def unmount_below(directory: Path) -> None:
    """Before a directory of the pod is removed: nothing may stay mounted below it."""
    prefix = os.fsencode(str(directory.resolve())) + b"/"
    below = [m.mount_point for m in mounts.mount_table() if m.mount_point.startswith(prefix)]
    for point in sorted(below, key=len, reverse=True):  # the deepest first
        with contextlib.suppress(OSError):
            mounts.umount2(os.fsdecode(point), mounts.MNT_DETACH)


def remove_tree(directory: Path) -> None:
    """Remove a pod's directory: first whatever is still mounted below it, since a recursive
    removal through a bind mount would delete host files."""
    unmount_below(directory)
    shutil.rmtree(directory, ignore_errors=True)

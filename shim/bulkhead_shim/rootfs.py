"""The container's root filesystem on the host: containerd's mounts, at ``bundle/rootfs``.

containerd hands the shim the snapshot as a list of mounts (an overlay of the image's layers,
or one bind mount for the ``native`` snapshotter). The shim mounts them where the bundle
expects the root, then shares that directory into the guest over virtio-fs. An empty list
means the bundle's ``rootfs`` is already a ready directory (``ctr run --rootfs``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Protocol

from bulkhead_agent.linux import mounts


class MountLike(Protocol):
    type: str
    source: str
    options: Sequence[str]


def mount_rootfs(rootfs_mounts: Sequence[MountLike], target: str) -> bool:
    """Mount them on ``target`` in order; True if anything was mounted (to undo later)."""
    os.makedirs(target, mode=0o711, exist_ok=True)
    done = 0
    try:
        for m in rootfs_mounts:
            _mount_one(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount_rootfs(target)
        raise
    return done > 0


def _mount_one(m: MountLike, target: str) -> None:
    options = mounts.parse_mount_options(list(m.options))
    fstype = m.type
    flags = options.flags
    if fstype == "bind":  # containerd's name for a bind mount, not a filesystem
        fstype, flags = "none", flags | mounts.MS_BIND
    if flags & mounts.MS_BIND:
        fstype = "none"
    try:
        mounts.mount(m.source or fstype, target, fstype, flags & ~mounts.MS_RDONLY, options.data)
        if flags & mounts.MS_BIND and flags & mounts.MS_RDONLY:
            # A bind mount ignores MS_RDONLY until it is remounted with it.
            mounts.mount(None, target, None, mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY)
        elif flags & mounts.MS_RDONLY:
            mounts.mount(None, target, None, mounts.MS_REMOUNT | flags)
    except OSError as exc:
        what = f"rootfs {m.type} mount of {m.source!r} on {target}: {exc.strerror}"
        raise OSError(exc.errno, what) from exc


def unmount_rootfs(target: str) -> None:
    """Unmount what ``mount_rootfs`` (or ``host_mounts``) put on ``target``, all of it and
    lazily, so that a straggling reader such as a virtiofsd that is exiting cannot make the
    delete fail; nothing there is fine."""
    while mounts.is_mount_point(target):
        try:
            mounts.umount2(target, mounts.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise

"""Each container's writable root: an overlay of its root directory under a private tmpfs.

Layout, per container: ``<run dir>/containers/<id>/`` is a tmpfs (so what the container
writes lives in memory, charged to the writer's memory cgroup, and goes with one unmount),
holding ``upper/`` and ``work/`` for overlayfs and ``rootfs/``, where the overlay of the
(read-only) lower directory is mounted. The lower directory, e.g. the image's shared busybox
rootfs, is never written.

``<run dir>/containers`` itself is bound onto itself and made a *shared* mount. A container's
mount namespace copies the guest's mounts as slaves of these; in a guest that runs from its
initramfs the container cannot detach the old root (it is moved over, not pivoted away), so
its copies of other containers' overlays stay below its root. Shared here, slave there: an
unmount in the guest reaches those copies too, and a removed container's tmpfs is freed.
"""

from __future__ import annotations

import errno
import os

from ..linux import mounts as m


def prepare_base(containers_dir: str) -> None:
    """Create ``containers_dir`` as a shared mount point (see the module text)."""
    # Search-only for others: a user-namespaced container's root (an unprivileged id on
    # the guest) must reach its own rootfs below here; it can list nothing.
    os.makedirs(containers_dir, 0o711, exist_ok=True)
    os.chmod(containers_dir, 0o711)
    # Not os.path.ismount, which cannot see a bind mount within one file system: a restarted
    # agent would stack a second bind over the first, hiding the containers' mounts below.
    if not m.is_mount_point(containers_dir):
        m.mount(containers_dir, containers_dir, None, m.MS_BIND)
    m.mount(None, containers_dir, None, m.MS_SHARED)


def release_base(containers_dir: str) -> None:
    """Undo :func:`prepare_base` (at agent stop; nothing may be mounted below any more)."""
    _unmount(containers_dir)


def _escape(path: str) -> str:
    # overlayfs splits options at ',' and layers at ':'; a backslash escapes either.
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def mount_overlay(lower: str, state_dir: str, owner: tuple[int, int] = (0, 0)) -> str:
    """Mount the tmpfs at ``state_dir`` and the overlay of ``lower``; returns the merged root.

    ``owner`` (guest uid, gid) owns the writable layer's root: the host ids that a user
    namespace maps its root to, so that root inside may write to ``/``.
    On failure nothing is left mounted and ``state_dir`` is gone.
    """
    teardown(state_dir)  # whatever a previous agent left under this id
    os.mkdir(state_dir, 0o755)
    try:
        m.mount("tmpfs", state_dir, "tmpfs", 0, "mode=0755")
        upper, work, merged = (os.path.join(state_dir, d) for d in ("upper", "work", "rootfs"))
        for directory in (upper, work, merged):
            os.mkdir(directory, 0o755)
            os.chown(directory, *owner)
        options = f"lowerdir={_escape(lower)},upperdir={_escape(upper)},workdir={_escape(work)}"
        try:
            m.mount("overlay", merged, "overlay", 0, options)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise OSError(exc.errno, "overlayfs is not available (module overlay?)") from None
            raise
    except BaseException:
        teardown(state_dir)
        raise
    return merged


def teardown(state_dir: str) -> None:
    """Unmount the overlay and the tmpfs under ``state_dir`` and remove it; missing is fine."""
    _unmount(os.path.join(state_dir, "rootfs"))
    _unmount(state_dir)
    try:
        os.rmdir(state_dir)
    except FileNotFoundError:
        pass


def _unmount(target: str) -> None:
    while True:
        try:
            m.umount2(target, m.UMOUNT_NOFOLLOW)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return  # not (or no longer) a mount point
            if exc.errno != errno.EBUSY:
                raise
            # Still in use (a process we could not kill holds it): detach it from the tree
            # now; the kernel frees it when the last user goes.
            m.umount2(target, m.MNT_DETACH | m.UMOUNT_NOFOLLOW)
        # Loop: something may have been mounted twice on the same spot.

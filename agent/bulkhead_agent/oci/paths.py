"""Paths inside a container's root filesystem, resolved as if that root were ``/``.

A mount destination such as ``/etc/resolv.conf`` must land inside the rootfs even when the
image makes ``/etc`` a symlink to ``/`` or ``../../host``: every symlink is followed by hand,
relative to the rootfs, and ``..`` stops at its top. The container's processes do not run
yet while its mounts are made, so the tree cannot change under us, except through a volume
shared with another container; the kernel's ``openat2(RESOLVE_IN_ROOT)`` would close that
gap too and is the natural next step.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_SYMLINKS = 40  # the kernel's own limit (ELOOP)


def resolve_in_root(root: str, path: str) -> str:
    """The host path of ``path`` inside ``root``, with every symlink resolved within ``root``.

    Components that do not exist are kept as they are (the caller creates them); the result
    never leaves ``root``.
    """
    root = os.path.abspath(root)
    pending = [part for part in reversed(path.split("/")) if part not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            mode = os.lstat(candidate).st_mode
        except FileNotFoundError:
            resolved.append(part)
            continue
        if not stat.S_ISLNK(mode):
            resolved.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, f"too many symbolic links resolving {path!r} in {root}")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []  # absolute links start again from the container's root
        pending.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
    return os.path.join(root, *resolved)


def make_mount_point(root: str, path: str, *, directory: bool = True, mode: int = 0o755) -> str:
    """Resolve ``path`` in ``root`` and create it (a directory, or an empty file) if missing.

    Returns the host path to mount on.
    """
    target = resolve_in_root(root, path)
    if directory:
        _makedirs_in_root(root, target, mode)
    else:
        _makedirs_in_root(root, os.path.dirname(target), 0o755)
        try:
            # O_NOFOLLOW: a symlink planted here since we resolved is refused, not followed.
            fd = os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            os.close(fd)
        except IsADirectoryError:
            pass  # binding a file onto a directory fails later, with a clearer error
    return target


def _makedirs_in_root(root: str, target: str, mode: int) -> None:
    # resolve_in_root left only plain names below the deepest existing directory, so
    # creating them one by one cannot follow a symlink out of the root.
    missing = []
    path = target
    while not os.path.lexists(path) and path != root:
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            pass

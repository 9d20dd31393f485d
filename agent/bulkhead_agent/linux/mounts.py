"""Mounts: ``mount(2)``, ``umount2(2)``, ``pivot_root(2)``, their flags, and OCI mount options."""

from __future__ import annotations

import os
from typing import NamedTuple

from .libc import check, libc, syscall_number

# <linux/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_I_VERSION = 0x800000
MS_STRICTATIME = 0x1000000
MS_LAZYTIME = 0x2000000

# umount2(2) flags.
MNT_FORCE = 0x1
MNT_DETACH = 0x2
MNT_EXPIRE = 0x4
UMOUNT_NOFOLLOW = 0x8

# Option -> (set it?, flag). "rw" clears MS_RDONLY and so on: the table the OCI runtime
# spec refers to (mount(8)'s filesystem-independent options).
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "async": (False, MS_SYNCHRONOUS),
    "atime": (False, MS_NOATIME),
    "bind": (True, MS_BIND),
    "defaults": (True, 0),
    "dev": (False, MS_NODEV),
    "diratime": (False, MS_NODIRATIME),
    "dirsync": (True, MS_DIRSYNC),
    "exec": (False, MS_NOEXEC),
    "iversion": (True, MS_I_VERSION),
    "lazytime": (True, MS_LAZYTIME),
    "loud": (False, MS_SILENT),
    "mand": (True, MS_MANDLOCK),
    "noatime": (True, MS_NOATIME),
    "nodev": (True, MS_NODEV),
    "nodiratime": (True, MS_NODIRATIME),
    "noexec": (True, MS_NOEXEC),
    "noiversion": (False, MS_I_VERSION),
    "nolazytime": (False, MS_LAZYTIME),
    "nomand": (False, MS_MANDLOCK),
    "norelatime": (False, MS_RELATIME),
    "nostrictatime": (False, MS_STRICTATIME),
    "nosuid": (True, MS_NOSUID),
    "nosymfollow": (True, MS_NOSYMFOLLOW),
    "rbind": (True, MS_BIND | MS_REC),
    "relatime": (True, MS_RELATIME),
    "remount": (True, MS_REMOUNT),
    "ro": (True, MS_RDONLY),
    "rw": (False, MS_RDONLY),
    "silent": (True, MS_SILENT),
    "strictatime": (True, MS_STRICTATIME),
    "suid": (False, MS_NOSUID),
    "sync": (True, MS_SYNCHRONOUS),
}

PROPAGATION_OPTIONS: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}

_FLAG_NAMES = {
    value: name
    for name, value in (
        ("MS_RDONLY", MS_RDONLY),
        ("MS_NOSUID", MS_NOSUID),
        ("MS_NODEV", MS_NODEV),
        ("MS_NOEXEC", MS_NOEXEC),
        ("MS_SYNCHRONOUS", MS_SYNCHRONOUS),
        ("MS_REMOUNT", MS_REMOUNT),
        ("MS_MANDLOCK", MS_MANDLOCK),
        ("MS_DIRSYNC", MS_DIRSYNC),
        ("MS_NOSYMFOLLOW", MS_NOSYMFOLLOW),
        ("MS_NOATIME", MS_NOATIME),
        ("MS_NODIRATIME", MS_NODIRATIME),
        ("MS_BIND", MS_BIND),
        ("MS_MOVE", MS_MOVE),
        ("MS_REC", MS_REC),
        ("MS_SILENT", MS_SILENT),
        ("MS_UNBINDABLE", MS_UNBINDABLE),
        ("MS_PRIVATE", MS_PRIVATE),
        ("MS_SLAVE", MS_SLAVE),
        ("MS_SHARED", MS_SHARED),
        ("MS_RELATIME", MS_RELATIME),
        ("MS_I_VERSION", MS_I_VERSION),
        ("MS_STRICTATIME", MS_STRICTATIME),
        ("MS_LAZYTIME", MS_LAZYTIME),
    )
}


class MountOptions(NamedTuple):
    """An OCI ``options`` list split the way ``mount(2)`` wants it."""

    flags: int  # MS_* flags for the mount itself
    propagation: int  # MS_SHARED/SLAVE/PRIVATE/UNBINDABLE (| MS_REC), applied separately; 0: none
    data: str  # filesystem-specific options, comma-joined ("size=65536k,mode=755")


def parse_mount_options(options: list[str] | tuple[str, ...]) -> MountOptions:
    """Split OCI mount options into flags, propagation and the data string.

    Later options win over earlier ones ("ro,rw" is read-write), as with mount(8).
    Anything that is not a known flag is filesystem data and is passed through untouched.
    """
    flags = 0
    propagation = 0
    data: list[str] = []
    for option in options:
        if option in _FLAG_OPTIONS:
            set_it, flag = _FLAG_OPTIONS[option]
            flags = flags | flag if set_it else flags & ~flag
        elif option in PROPAGATION_OPTIONS:
            propagation = PROPAGATION_OPTIONS[option]
        elif option:
            data.append(option)
    return MountOptions(flags, propagation, ",".join(data))


def flag_names(flags: int) -> str:
    """``MS_BIND|MS_REC`` for error messages; ``0`` when empty."""
    if not flags:
        return "0"
    names = [name for bit, name in _FLAG_NAMES.items() if flags & bit]
    rest = flags & ~sum(bit for bit in _FLAG_NAMES if flags & bit)
    if rest:
        names.append(hex(rest))
    return "|".join(names)


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str | None,
    target: str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    result = libc().mount(_b(source), _b(target), _b(fstype), flags, _b(data or None))
    check(result, f"mount({source!r}, {target!r}, {fstype!r}, {flag_names(flags)}, {data!r})")


def umount2(target: str, flags: int = 0) -> None:
    check(libc().umount2(_b(target), flags), f"umount2({target!r}, {flags:#x})")


def pivot_root(new_root: str, put_old: str) -> None:
    import ctypes

    number = ctypes.c_long(syscall_number("pivot_root"))
    result = libc().syscall(number, ctypes.c_char_p(_b(new_root)), ctypes.c_char_p(_b(put_old)))
    check(result, f"pivot_root({new_root!r}, {put_old!r})")


# statvfs f_flag bits share values with MS_* except ST_RELATIME (4096).
_ST_RELATIME = 0x1000
_STATVFS_KEPT = (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_SYNCHRONOUS | MS_MANDLOCK) | (
    MS_NOATIME | MS_NODIRATIME
)


def mount_flags_of(path: str) -> int:
    """The per-mount flags of the mount holding ``path``, as MS_* bits.

    A bind remount must repeat the flags the kernel locked (nosuid, nodev, ...) when the
    mount came from a more privileged namespace, or it fails with EPERM.
    """
    f_flag = os.statvfs(path).f_flag
    flags = f_flag & _STATVFS_KEPT
    if f_flag & _ST_RELATIME:
        flags |= MS_RELATIME
    return flags


class MountInfo(NamedTuple):
    """One line of ``/proc/self/mountinfo``: where something is mounted, and what."""

    mount_point: bytes
    fstype: bytes


def mount_table(path: str = "/proc/self/mountinfo") -> list[MountInfo]:
    """The mounts the calling process sees, in mount order (the last on a point is on top).

    The kernel's own table, unlike ``os.path.ismount``, also sees a bind mount within one
    file system.
    """
    table = []
    with open(path, "rb") as f:
        for line in f:
            # mount ID, parent ID, major:minor, root, mount point, options, ... "-" fstype ...
            fields = line.split()
            point = fields[4]
            if b"\\" in point:  # space, tab, newline and backslash come octal-escaped
                point = point.decode("unicode_escape").encode("latin-1")
            table.append(MountInfo(point, fields[fields.index(b"-") + 1]))
    return table


def is_mount_point(path: str) -> bool:
    """Whether something is mounted exactly at ``path``."""
    target = os.fsencode(os.path.realpath(path))
    return any(m.mount_point == target for m in mount_table())


def root_is_initramfs() -> bool:
    """True when ``/`` is the kernel's initial rootfs, which ``pivot_root`` cannot leave.

    A guest that runs straight from its initramfs (ours does) must move the container's
    root over ``/`` and chroot instead.
    """
    on_root = [m.fstype for m in mount_table() if m.mount_point == b"/"]
    return bool(on_root) and on_root[-1] == b"rootfs"

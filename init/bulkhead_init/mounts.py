"""Early filesystems: /proc, /sys, /dev and friends, and unmounting them at power-off.

Idempotent: a target that is already a mount point is left alone (a kernel with devtmpfs
automount, or a test namespace, may have mounted it), except /proc, which must belong to
our own PID namespace for /proc/<pid> and /proc/self to mean anything.

``root`` prefixes every target so tests can mount into a scratch directory.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .log import Logger

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MNT_DETACH = 0x2

_SAFE = MS_NOSUID | MS_NODEV | MS_NOEXEC
# newinstance: the guest's ptys are private to this mount; gid 5 is Debian's tty group.
_DEVPTS = "newinstance,ptmxmode=0666,mode=0620,gid=5"

# (fstype, target, flags, data, directory mode), in mount order: parents first.
PROC = ("proc", "/proc", _SAFE, "", 0o555)
TABLE = (
    ("sysfs", "/sys", _SAFE, "", 0o555),
    ("devtmpfs", "/dev", MS_NOSUID, "mode=0755", 0o755),
    ("devpts", "/dev/pts", MS_NOSUID | MS_NOEXEC, _DEVPTS, 0o755),
    ("tmpfs", "/dev/shm", MS_NOSUID | MS_NODEV, "mode=1777", 0o1777),
    ("tmpfs", "/run", MS_NOSUID | MS_NODEV, "mode=0755", 0o755),
    ("tmpfs", "/tmp", MS_NOSUID | MS_NODEV, "mode=1777", 0o1777),
)

# Created only where missing: /dev may be the host's devtmpfs in a test namespace.
LINKS = (
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
    # Since Linux 4.7 a /dev/ptmx device node finds pts/ptmx by itself; the link is only
    # for a /dev that has no ptmx at all.
    ("/dev/ptmx", "pts/ptmx"),
)


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash in octal: "\040".
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Mount points of our mount namespace, in the kernel's order (parents first)."""
    try:
        with open("/proc/self/mounts") as f:
            return [_unescape(line.split()[1]) for line in f if line.strip()]
    except OSError:
        return []  # no /proc yet


def _mount(fstype: str, target: str, flags: int, data: str, mode: int) -> None:
    from . import libc

    os.makedirs(target, mode, exist_ok=True)
    libc.mount(fstype, target, fstype, flags, data)


def _proc_is_ours(proc: str) -> bool:
    try:
        return os.readlink(os.path.join(proc, "self")) == str(os.getpid())
    except OSError:
        return False


def mount_proc(log: Logger, root: str = "/") -> bool:
    """Mount /proc first: the command line and every later check read it."""
    fstype, target, flags, data, mode = PROC
    path = os.path.join(root, target.lstrip("/"))
    if _proc_is_ours(path):
        log.debug(f"{path} already mounted")
        return False
    try:
        _mount(fstype, path, flags, data, mode)
    except OSError as exc:
        log.error(f"cannot mount {path}: {exc}")
        return False
    return True


def setup(log: Logger, root: str = "/") -> list[str]:
    """Mount the rest of the table and create the /dev links; return what was mounted."""
    present = set(mount_points())
    mounted: list[str] = []
    skipped: list[str] = []
    for fstype, target, flags, data, mode in TABLE:
        path = os.path.join(root, target.lstrip("/"))
        if path in present:
            skipped.append(path)
            continue
        try:
            _mount(fstype, path, flags, data, mode)
        except OSError as exc:
            log.error(f"cannot mount {fstype} on {path}: {exc}")
            continue
        mounted.append(path)
        present.add(path)
    _links(log, root)
    log.info(
        "mounted "
        + (", ".join(mounted) or "nothing")
        + (f" (already mounted: {', '.join(skipped)})" if skipped else "")
    )
    return mounted


def _links(log: Logger, root: str) -> None:
    for link, dest in LINKS:
        path = os.path.join(root, link.lstrip("/"))
        if os.path.lexists(path):
            continue
        try:
            os.symlink(dest, path)
        except OSError as exc:
            log.warning(f"cannot link {path} -> {dest}: {exc}")


def unmount_all(log: Logger) -> int:
    """Detach every mount but / in reverse order (children before parents); return the count.

    Lazy (MNT_DETACH) because something may still hold a file open, and a detach still
    lets the filesystem flush once the last user is gone; the caller has synced already.
    """
    from . import libc

    done = 0
    for target in reversed(mount_points()):
        if target == "/":
            continue
        try:
            libc.umount(target, MNT_DETACH)
            done += 1
        except OSError as exc:
            log.debug(f"cannot unmount {target}: {exc}")
    return done

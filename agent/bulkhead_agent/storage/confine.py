"""Paths a request names, kept inside the directory they are meant for.

Requests name paths relative to a root the agent owns (a storage's mount point, the storage
directory itself). Two checks keep them there:

- lexically: no absolute path, no ``..``, no empty or NUL-bearing name (:func:`components`);
- in the kernel: every lookup goes through ``openat2(2)`` from a descriptor of the root with
  ``RESOLVE_BENEATH`` (a symlink or mount crossing that would leave the root fails with
  EXDEV instead of being followed) and ``RESOLVE_NO_MAGICLINKS``; mount points also get
  ``RESOLVE_NO_SYMLINKS`` and ``RESOLVE_NO_XDEV``. What was resolved is then used through its
  descriptor (``/proc/self/fd/N`` for mount(2)), so a symlink swapped in afterwards changes
  nothing.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ..linux.libc import libc

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
# The same number on x86_64 and aarch64 (the unified syscall table, Linux 5.6).
_SYS_OPENAT2 = 437
MAX_PATH_BYTES = 4096

# Mount points: no symlink at all, and never into another filesystem (another storage).
STRICT = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV
# Files in a storage: symlinks are fine as long as they stay inside.
BENEATH = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS


class PathRefused(ValueError):
    """A path that names something outside where it must stay (the message says why)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """``openat2(2)``: a new descriptor, or ``OSError``."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    lib = libc()
    result = lib.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(result)


def components(path: str, field: str = "path", *, allow_empty: bool = False) -> list[str]:
    """The names in a relative ``path``; :class:`PathRefused` for anything that could leave."""
    if "\0" in path:
        raise PathRefused(f"{field}: contains a NUL byte")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise PathRefused(f"{field}: longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise PathRefused(f"{field}: {path!r} must be relative")
    names = [n for n in path.split("/") if n not in ("", ".")]
    if ".." in names:
        raise PathRefused(f"{field}: {path!r} must not contain '..'")
    if not names and not allow_empty:
        raise PathRefused(f"{field}: names nothing")
    return names


def _refusal(exc: OSError, field: str, shown: str) -> PathRefused | OSError:
    if exc.errno == errno.EXDEV:
        return PathRefused(f"{field}: {shown!r} leads out of its storage (symlink or mount)")
    if exc.errno == errno.ELOOP:
        return PathRefused(f"{field}: {shown!r} goes through a symlink, which is not allowed here")
    if exc.errno == errno.ENOTDIR:
        return PathRefused(f"{field}: a component of {shown!r} is not a directory")
    return exc


def open_dir(
    root_fd: int,
    names: list[str],
    *,
    resolve: int = BENEATH,
    create: bool = False,
    mode: int = 0o755,
    owner: tuple[int, int] | None = None,
    field: str = "path",
) -> int:
    """A descriptor of directory ``root/names...``, resolved beneath ``root_fd``.

    Each prefix is resolved from the root (a symlink inside may point anywhere inside,
    ``..`` included). With ``create``, a missing directory is made inside the descriptor of
    its resolved parent (never through a path the kernel looks up again), with ``mode`` and
    ``owner``.
    """
    fd = os.dup(root_fd)
    try:
        for index, name in enumerate(names):
            prefix = "/".join(names[: index + 1])
            flags = os.O_RDONLY | os.O_DIRECTORY
            try:
                child = openat2(root_fd, prefix, flags, resolve=resolve)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                    if owner is not None:
                        os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
                except FileExistsError:
                    pass  # made meanwhile: open it as it is
                try:
                    child = openat2(fd, name, flags, resolve=resolve | RESOLVE_NO_SYMLINKS)
                except OSError as exc:
                    raise _refusal(exc, field, prefix) from None
            except OSError as exc:
                raise _refusal(exc, field, prefix) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_in(root_fd: int, path: str, flags: int, mode: int = 0, *, field: str = "path") -> int:
    """Open ``path`` (checked by :func:`components`) below ``root_fd``, staying beneath it."""
    names = components(path, field)
    try:
        return openat2(root_fd, "/".join(names), flags, mode, BENEATH)
    except OSError as exc:
        raise _refusal(exc, field, path) from None


def fd_path(fd: int) -> str:
    """The path that makes the kernel use exactly what ``fd`` refers to (mount(2), stat)."""
    return f"/proc/self/fd/{fd}"


def real_path(fd: int) -> str:
    """Where ``fd`` is, as a plain path (for messages and for other processes)."""
    return os.readlink(fd_path(fd))

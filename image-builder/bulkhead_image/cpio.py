"""A deterministic cpio "newc" (SVR4, no CRC) writer: the format the kernel unpacks as initramfs.

Written here rather than driving GNU cpio so that the bytes depend only on the entries:
paths are sorted, every entry is owned by root with one fixed mtime, and inode numbers are
assigned in order. Device nodes are plain header fields, so no ``mknod`` (or root) is needed.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    path: str  # inside the archive, without a leading "/"
    mode: int  # full st_mode: file type bits and permissions
    data: bytes | Path = b""  # file contents (or a file to read them from), symlink target
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def file(path: str, data: bytes | Path, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o666) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _sort_key(entry: Entry) -> tuple[str, ...]:
    # Component-wise so that a directory always precedes what it contains.
    return tuple(entry.path.split("/"))


def _header(ino: int, entry: Entry, size: int, mtime: int, name: bytes) -> bytes:
    fields = (
        ino,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if entry.is_dir else 1,  # nlink: no hard links are ever written
        mtime,
        size,
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name) + 1,
        0,  # check: unused by "newc"
    )
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _validate(entries: list[Entry]) -> None:
    dirs = {""}
    seen: set[str] = set()
    for e in entries:
        if not e.path or e.path.startswith("/") or e.path.endswith("/") or "//" in e.path:
            raise ValueError(f"bad archive path {e.path!r}")
        if e.path in seen:
            raise ValueError(f"duplicate archive path {e.path!r}")
        seen.add(e.path)
        parent = e.path.rpartition("/")[0]
        # The kernel does not create missing parents: a file without its directory is lost.
        if parent not in dirs:
            raise ValueError(f"{e.path!r} comes without its directory {parent!r}")
        if e.is_dir:
            dirs.add(e.path)


def write(entries: Iterable[Entry], out: BinaryIO, mtime: int = 0) -> int:
    """Write the archive (sorted, with its trailer) to ``out``; returns the number of entries."""
    ordered = sorted(entries, key=_sort_key)
    _validate(ordered)
    offset = 0
    for ino, entry in enumerate(ordered, start=1):
        if stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode):
            data = entry.data.read_bytes() if isinstance(entry.data, Path) else entry.data
        else:
            data = b""
        name = entry.path.encode()
        head = _header(ino, entry, len(data), mtime, name) + name + b"\0"
        head += _pad(offset + len(head))
        out.write(head)
        out.write(data)
        out.write(_pad(len(data)))
        offset += len(head) + len(data) + len(_pad(len(data)))
    trailer = Entry(TRAILER, 0)
    name = TRAILER.encode()
    head = _header(0, trailer, 0, 0, name) + name + b"\0"
    head += _pad(offset + len(head))
    offset += len(head)
    # Zero-fill to a 512-byte record, as GNU cpio does: then `(cpio -i; cpio -i) < img` reads
    # concatenated archives cleanly too. The kernel skips zeros between archives.
    out.write(head + b"\0" * (-offset % 512))
    return len(ordered)


def pack(entries: Iterable[Entry], mtime: int = 0) -> bytes:
    import io

    buf = io.BytesIO()
    write(entries, buf, mtime)
    return buf.getvalue()

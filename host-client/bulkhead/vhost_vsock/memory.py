"""Guest memory as the front-end shares it: regions mapped from memfds, bounds-checked.

``SET_MEM_TABLE`` names each region three ways: its guest-physical address
(what descriptors contain), QEMU's own virtual address of it (what
``SET_VRING_ADDR`` contains) and an offset into the file descriptor that
carries it. Every access the guest can steer goes through ``_locate``, which
refuses anything not wholly inside one region: guest addresses are input from
a possibly hostile guest.

Reads return copies and writes copy in (``bytes``, ``struct.*_from``, a
memoryview released before the call returns), so no ``memoryview`` of a mapping
outlives a call and a table can always be unmapped when QEMU replaces it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .protocol import MemRegion

# Guest memory is little endian; the index stores below are native ones.
if sys.byteorder != "little":
    raise ImportError("the vhost-user backend supports little-endian hosts only")

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """An address range that is not guest memory (or not all in one region)."""


@dataclass(eq=False)
class Region:
    guest_addr: int
    size: int
    user_addr: int
    buf: mmap.mmap | bytearray  # the bytes of the region start at ``base`` in it
    base: int = 0

    @property
    def guest_end(self) -> int:
        return self.guest_addr + self.size


class GuestMemory:
    """A memory table: at most a few regions, searched in order (the last hit first)."""

    def __init__(self, regions: Sequence[Region] = ()) -> None:
        for r in regions:
            if r.size <= 0 or r.base < 0 or r.base + r.size > len(r.buf):
                raise GuestMemoryError(f"region at {r.guest_addr:#x} does not fit its buffer")
        self.regions = list(regions)
        self._last = self.regions[0] if self.regions else None

    @classmethod
    def map(cls, table: Sequence[MemRegion], fds: Sequence[int]) -> GuestMemory:
        """Map each region of ``table`` from its descriptor (``fds[i]`` for region i).

        The descriptors are not closed here (the caller owns them; mmap keeps
        its own reference). ``mmap`` wants a page-aligned file offset, so a
        region whose ``mmap_offset`` is not aligned is mapped from the page
        below it and used from the right byte on.
        """
        if len(fds) != len(table):
            raise GuestMemoryError(f"{len(table)} memory regions but {len(fds)} descriptors")
        regions: list[Region] = []
        try:
            for entry, fd in zip(table, fds, strict=True):
                if entry.size <= 0:
                    raise GuestMemoryError(f"empty memory region at {entry.guest_addr:#x}")
                start = entry.mmap_offset - entry.mmap_offset % mmap.ALLOCATIONGRANULARITY
                skip = entry.mmap_offset - start
                try:
                    buf = mmap.mmap(
                        fd,
                        skip + entry.size,
                        flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=start,
                    )
                except (OSError, ValueError, OverflowError) as exc:
                    raise GuestMemoryError(
                        f"cannot map memory region at {entry.guest_addr:#x} "
                        f"({entry.size:#x} bytes at offset {entry.mmap_offset:#x}): {exc}"
                    ) from exc
                regions.append(Region(entry.guest_addr, entry.size, entry.user_addr, buf, skip))
            return cls(regions)
        except BaseException:
            for r in regions:
                if isinstance(r.buf, mmap.mmap):
                    r.buf.close()
            raise

    def close(self) -> None:
        for r in self.regions:
            if isinstance(r.buf, mmap.mmap):
                with contextlib.suppress(BufferError):
                    r.buf.close()
        self.regions = []
        self._last = None

    def describe(self) -> str:
        return ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in self.regions) or "empty"

    # -- translation --

    def _locate(self, gpa: int, length: int) -> tuple[Region, int]:
        """The region holding ``[gpa, gpa + length)`` and the offset of ``gpa`` in its buffer."""
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        last = self._last
        if last is not None and last.guest_addr <= gpa and gpa + length <= last.guest_end:
            return last, last.base + gpa - last.guest_addr
        for r in self.regions:
            if r.guest_addr <= gpa < r.guest_end or (length == 0 and gpa == r.guest_end):
                if gpa + length > r.guest_end:
                    raise GuestMemoryError(
                        f"guest range {gpa:#x}+{length:#x} runs past the end of the region "
                        f"{r.guest_addr:#x}+{r.size:#x}"
                    )
                self._last = r
                return r, r.base + gpa - r.guest_addr
        raise GuestMemoryError(f"guest address {gpa:#x} is not in guest memory")

    def check(self, gpa: int, length: int) -> None:
        """Raise ``GuestMemoryError`` unless ``[gpa, gpa + length)`` is guest memory."""
        self._locate(gpa, length)

    def user_to_guest(self, uva: int, length: int) -> int:
        """The guest address of QEMU's virtual address ``uva`` (ring addresses come so)."""
        for r in self.regions:
            if r.user_addr <= uva and uva + length <= r.user_addr + r.size:
                return r.guest_addr + uva - r.user_addr
        raise GuestMemoryError(f"front-end address {uva:#x}+{length:#x} is not in guest memory")

    # -- access --

    def read(self, gpa: int, length: int) -> bytes:
        region, off = self._locate(gpa, length)
        return region.buf[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region, off = self._locate(gpa, len(data))
        region.buf[off : off + len(data)] = data

    def read_u16(self, gpa: int) -> int:
        region, off = self._locate(gpa, 2)
        return _U16.unpack_from(region.buf, off)[0]

    def read_u32(self, gpa: int) -> int:
        region, off = self._locate(gpa, 4)
        return _U32.unpack_from(region.buf, off)[0]

    def read_u64(self, gpa: int) -> int:
        region, off = self._locate(gpa, 8)
        return _U64.unpack_from(region.buf, off)[0]

    # The guest reads what these write while they write it (the used index above all), so
    # each must be one store of the new value. struct.pack_into is not: it clears its
    # target before packing into it, and a guest that read the used index in between saw
    # 0, took the ring's stale entries for new ones ("id N is not a head!", zeroed
    # packets) and gave the queue up. A one-item memoryview cast stores the value with a
    # single native (little-endian, as virtio wants, on this x86-64 host) 16/32-bit write.

    def write_u16(self, gpa: int, value: int) -> None:
        region, off = self._locate(gpa, 2)
        with memoryview(region.buf) as view, view[off : off + 2] as part, part.cast("H") as word:
            word[0] = value

    def write_u32(self, gpa: int, value: int) -> None:
        region, off = self._locate(gpa, 4)
        with memoryview(region.buf) as view, view[off : off + 4] as part, part.cast("I") as word:
            word[0] = value


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

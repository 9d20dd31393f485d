"""How far each output stream of a process was numbered, kept where the next agent finds it.

Attach numbers every byte of a stream (``buffer``). An agent that dies takes along what it had
read from the pipes and not yet delivered; the agent after it reads on from the same pipes,
and must not number that as if it followed on, or a host resuming at its offset would miss
those bytes without noticing. So it starts each stream where this file says the dead agent
stopped, and Attach tells a host that resumes below that about the gap (``services.attach``).

The file is a MAP_SHARED mapping of one tmpfs page, which outlives the process writing it, so
keeping it up to date costs no system call: before each read the reader stores the most the
read may bring (end + size), after it the exact end. Killed between the two, the record is a
little ahead of what was read: a few offsets are never used, none is used twice. Each store is
one aligned 8-byte write (a memoryview of format "Q"), which no signal can tear.
"""

from __future__ import annotations

import mmap
import os

STDOUT, STDERR = 0, 1
_SIZE = 16  # two little 64-bit slots


class Offsets:
    """The two slots of one process; in memory only without a ``path`` (never adopted)."""

    __slots__ = ("_map", "_slots")

    def __init__(self, path: str = "", *, fresh: bool = True) -> None:
        self._map: mmap.mmap | None = None
        if not path:
            self._slots = memoryview(bytearray(_SIZE)).cast("Q")
            return
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if fresh else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)  # zeros: a stream not numbered yet
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("Q")

    def __getitem__(self, slot: int) -> int:
        return self._slots[slot]

    def __setitem__(self, slot: int, value: int) -> None:
        self._slots[slot] = value

    def close(self) -> None:
        self._slots.release()
        if self._map is not None:
            self._map.close()
            self._map = None

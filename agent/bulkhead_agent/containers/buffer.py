"""One output stream of a process, kept in the agent until the host acknowledges it.

Every byte a process writes gets a stream offset (0, 1, 2, ...). The buffer holds the bytes
from ``acked`` (everything below was acknowledged and freed) up to ``end`` (everything read
from the pipe so far). The reader only takes more from the pipe while ``room`` is left, so a
host that reads slowly, or not at all, stalls the writing process on a full pipe instead of
losing its output (DESIGN decision 5).

A stream adopted from an agent that died starts at ``start`` instead of 0 (see ``offsets``):
what that agent had read and not delivered is gone, and nothing of it is numbered again.

Storage is a queue of fixed-size chunks plus a growing tail. Fixed sizes make an offset's chunk
a division away, whatever the order readers ask in, and a full chunk goes out as one message
without being copied again.
"""

from __future__ import annotations

from collections import deque

CHUNK = 64 * 1024  # also the largest Output message the agent sends
LIMIT = 1024 * 1024  # unacknowledged bytes kept per stream before the writer is stalled


class OutputBuffer:
    __slots__ = ("_base", "_chunks", "_tail", "acked", "end", "eof", "limit", "start")

    def __init__(self, limit: int = LIMIT, start: int = 0) -> None:
        self.limit = limit
        self.start = start  # the first offset this agent numbered (0 unless adopted)
        self.acked = start  # bytes below this offset were acknowledged (and are freed)
        self.end = start  # offset after the last byte read from the process so far
        self.eof = False  # the process side closed: ``end`` is final
        self._chunks: deque[bytes] = deque()  # each exactly CHUNK bytes
        self._base = start  # offset of _chunks[0] (start plus a multiple of CHUNK)
        self._tail = bytearray()  # the bytes after the last full chunk

    @property
    def kept(self) -> int:
        """Bytes produced and not yet acknowledged: what counts against ``limit``."""
        return self.end - self.acked

    @property
    def room(self) -> int:
        return max(0, self.limit - self.kept)

    def append(self, data: bytes) -> None:
        if not data:
            return
        size = len(data)
        start = 0
        if not self._tail:
            if size == CHUNK:
                self._chunks.append(data)  # common under load: no copy at all
                self.end += size
                return
            # Whole chunks straight from the data: one copy each, not two via the tail.
            while size - start >= CHUNK:
                self._chunks.append(data[start : start + CHUNK])
                start += CHUNK
        self._tail += data[start:] if start else data
        while len(self._tail) >= CHUNK:
            self._chunks.append(bytes(self._tail[:CHUNK]))
            del self._tail[:CHUNK]
        self.end += size

    def check_offset(self, offset: int) -> str | None:
        """Why ``offset`` cannot be read from (None if it can).

        Below ``start`` is fine: a host resuming a stream numbered by an agent that died;
        it resumes at ``acked`` (the caller tells it about the gap).
        """
        if offset < self.start:
            return None
        if offset < self.acked:
            return f"{offset} is below {self.acked}, where the kept data starts (acknowledged)"
        if offset > self.end:
            return f"{offset} is beyond the {self.end} bytes produced so far"
        return None

    def ack(self, offset: int) -> bool:
        """Free everything below ``offset``; returns whether anything changed.

        Offsets at or below the current one are ignored (acks may arrive out of date);
        offsets beyond ``end`` raise ValueError (the host cannot have received them).
        """
        if offset <= self.acked:
            return False
        if offset > self.end:
            raise ValueError(f"{offset} is beyond the {self.end} bytes produced so far")
        self.acked = offset
        # Only whole chunks are freed; a partly acknowledged one stays until it is all done.
        while self._chunks and self._base + CHUNK <= offset:
            self._chunks.popleft()
            self._base += CHUNK
        return True

    def read(self, offset: int, size: int = CHUNK) -> bytes:
        """Up to ``size`` bytes from ``offset`` (never across a chunk boundary); b"" at end."""
        if offset >= self.end:
            return b""
        if offset < self.acked:
            raise ValueError(self.check_offset(offset))
        tail_start = self._base + len(self._chunks) * CHUNK
        if offset < tail_start:
            index, within = divmod(offset - self._base, CHUNK)
            chunk = self._chunks[index]
            if within == 0 and size >= CHUNK:
                return chunk
            return chunk[within : within + size]
        start = offset - tail_start
        return bytes(self._tail[start : start + size])

    def clear(self) -> None:
        """Drop everything (the process is being forgotten)."""
        self._chunks.clear()
        self._tail = bytearray()
        self._base = self.acked = self.end

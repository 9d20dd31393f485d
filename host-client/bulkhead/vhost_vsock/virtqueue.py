"""Split virtqueues (virtio 1.x, "Split Virtqueues"), read and written in guest memory.

Layout, all little endian: the descriptor table (``size`` entries of
``addr u64, len u32, flags u16, next u16``), the available ring
(``flags u16, idx u16, ring[size] u16``) that the driver fills with chain
heads, and the used ring (``flags u16, idx u16, ring[size] {id u32, len u32}``)
where the device returns them.

Everything here reads guest-controlled memory, so each index and each
descriptor is checked before use: a head or ``next`` beyond the table, a chain
longer than the table (a loop), a descriptor outside guest memory, an
indirect descriptor (not negotiated), a device-readable descriptor after a
writable one, or an available index more than ``size`` ahead are refused with
``ChainError`` (the chain is dropped, and returned to the guest when its head
is known) or ``QueueError`` (the ring as a whole is broken).

The device side keeps one invariant of its own: a head goes back to the driver
only while the device holds it (taken by ``pop``, not yet pushed). Returning a
head twice is the one device mistake a Linux guest cannot survive (it reports
"id N is not a head!" and stops using the queue for good), so ``push`` refuses
it with ``QueueError``: the queue stops here, with a log naming the head,
rather than in the guest. For the same reason ``push`` checks that the used
index in guest memory is still the one it last wrote: only the device writes
it, and a different value would have the guest read stale entries.

Ordering: the device reads the available index before the entries it covers
and writes a used entry before the used index. CPython does each of these as
a plain memory copy in program order, and x86-64 (TSO) neither reorders loads
with loads nor stores with stores, which is what the virtio read and write
barriers are for on this host. The indices themselves must each be one store
(``GuestMemory.write_u16``): a guest reads them while they change, and a used
index that passed through 0 on its way made the guest take stale entries for
new ones. One ordering x86 does relax is a store followed by a load: between
publishing the used index and reading the driver's NO_INTERRUPT flag the device
needs a full barrier, or it can read a stale flag while the driver (which
re-enables interrupts and then re-reads the used index) still sees the old
index, and the interrupt is lost for good.
``full_barrier`` provides it with a locked instruction.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from dataclasses import dataclass, field

from .memory import GuestMemory, GuestMemoryError

MAX_QUEUE_SIZE = 32768

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

AVAIL_F_NO_INTERRUPT = 1

# How many of its last pops and pushes a queue remembers for ``dump`` (a post-mortem of
# a ring the guest reports broken; an append to a bounded deque per chain).
HISTORY = 512

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

_fence = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier: taking an uncontended lock is an atomic read-modify-write
    (a ``lock``-prefixed instruction on x86), which orders all earlier loads and stores
    before all later ones. Pure Python has no fence of its own."""
    _fence.acquire()
    _fence.release()


class QueueError(Exception):
    """The ring itself is unusable (bad layout or index); nothing more can be taken from it."""


class ChainError(Exception):
    """One descriptor chain is bad. ``head`` is its head index when that one was valid."""

    def __init__(self, message: str, head: int | None = None) -> None:
        super().__init__(message)
        self.head = head


@dataclass
class Chain:
    """A descriptor chain: the device-readable buffers, then the device-writable ones."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)

    def read(self, memory: GuestMemory, limit: int) -> bytes:
        """All readable bytes, in order; ``ChainError`` if there are more than ``limit``."""
        total = self.readable_len
        if total > limit:
            raise ChainError(f"chain carries {total} bytes, more than {limit}", self.head)
        return b"".join(memory.read(addr, length) for addr, length in self.readable)

    def write(self, memory: GuestMemory, data: bytes) -> int:
        """Scatter ``data`` over the writable buffers; returns the bytes written."""
        if len(data) > self.writable_len:
            raise ChainError(
                f"{len(data)} bytes do not fit the chain's {self.writable_len}", self.head
            )
        view = memoryview(data)
        pos = 0
        for addr, length in self.writable:
            if pos >= len(view):
                break
            n = min(length, len(view) - pos)
            memory.write(addr, view[pos : pos + n])
            pos += n
        return pos


def _check_size(size: int) -> None:
    if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise QueueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")


class Virtqueue:
    """The device side of one split virtqueue in ``memory`` (guest-physical addresses)."""

    def __init__(
        self,
        memory: GuestMemory,
        size: int,
        desc: int,
        avail: int,
        used: int,
        *,
        last_avail_idx: int = 0,
        index: int = 0,
    ) -> None:
        _check_size(size)
        for name, addr, align, length in (
            ("descriptor table", desc, 16, 16 * size),
            ("available ring", avail, 2, 6 + 2 * size),
            ("used ring", used, 4, 6 + 8 * size),
        ):
            if addr % align:
                raise QueueError(f"queue {index}: {name} at {addr:#x} is not {align}-aligned")
            try:
                memory.check(addr, length)
            except GuestMemoryError as exc:
                raise QueueError(f"queue {index}: {name}: {exc}") from exc
        self.memory = memory
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        self.index = index
        self.last_avail_idx = last_avail_idx & 0xFFFF
        # Where the previous user of the ring (or the reset driver: 0) left it.
        self.used_idx = memory.read_u16(used + 2)
        self.held: set[int] = set()  # heads taken by pop and not yet pushed back
        self._avail_seen = 0
        # ("pop", available index taken, available index seen, head) and
        # ("push", used index written, head, bytes written), oldest first.
        self.history: deque[tuple[str, int, int, int]] = deque(maxlen=HISTORY)

    def __repr__(self) -> str:
        return f"Virtqueue(index={self.index}, size={self.size})"

    # -- the available side --

    def pending(self) -> int:
        """How many chains the driver has made available that we have not taken."""
        avail_idx = self.memory.read_u16(self.avail + 2)
        self._avail_seen = avail_idx
        n = (avail_idx - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            raise QueueError(
                f"queue {self.index}: available index {avail_idx} is {n} ahead of "
                f"{self.last_avail_idx}, more than the queue size {self.size}"
            )
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None. Raises ``ChainError`` / ``QueueError``."""
        if not self.pending():
            return None
        slot = self.last_avail_idx % self.size
        head = self.memory.read_u16(self.avail + 4 + 2 * slot)
        self.history.append(("pop", self.last_avail_idx, self._avail_seen, head))
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if head >= self.size:
            raise ChainError(f"queue {self.index}: chain head {head} is beyond the table")
        if head in self.held:
            # The driver offered a chain it has not had back; taking it again would
            # mean returning it twice. Its own ring is broken.
            raise QueueError(f"queue {self.index}: head {head} offered again while in use")
        self.held.add(head)  # before the walk: a bad chain still goes back by its head
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        chain = Chain(head)
        idx = head
        for _ in range(self.size):
            addr, length, flags, nxt = _DESC.unpack(self.memory.read(self.desc + 16 * idx, 16))
            if flags & DESC_F_INDIRECT:
                raise ChainError(f"queue {self.index}: indirect descriptor {idx}", head)
            if length:
                try:
                    self.memory.check(addr, length)
                except GuestMemoryError as exc:
                    raise ChainError(f"queue {self.index}: descriptor {idx}: {exc}", head) from exc
            if flags & DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise ChainError(
                    f"queue {self.index}: readable descriptor {idx} after a writable one", head
                )
            else:
                chain.readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return chain
            if nxt >= self.size:
                raise ChainError(f"queue {self.index}: descriptor {idx} points to {nxt}", head)
            idx = nxt
        raise ChainError(
            f"queue {self.index}: chain from {head} is longer than the queue (a loop?)", head
        )

    def unpop(self, chain: Chain) -> None:
        """Give back ``chain``, the one last taken by ``pop`` (nothing was written to it)."""
        self.held.discard(chain.head)
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
        self.history.append(("unpop", self.last_avail_idx, self._avail_seen, chain.head))

    # -- the used side --

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver, ``written`` bytes of it filled."""
        if head not in self.held:
            raise QueueError(
                f"queue {self.index}: refusing to return head {head}, which the device "
                "does not hold (already returned, or never taken)"
            )
        seen = self.memory.read_u16(self.used + 2)
        if seen != self.used_idx:
            # Only the device writes the used index. A different value means another
            # writer, or a stale copy of this queue: either way more pushes would hand
            # the guest entries from an earlier lap of the ring.
            raise QueueError(
                f"queue {self.index}: the used index is {seen} in guest memory, "
                f"not {self.used_idx} as the device last wrote it"
            )
        self.held.discard(head)
        slot = self.used_idx % self.size
        self.memory.write(self.used + 4 + 8 * slot, _USED_ELEM.pack(head, written))
        self.history.append(("push", self.used_idx, head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.memory.write_u16(self.used + 2, self.used_idx)

    def wants_interrupt(self) -> bool:
        """Whether the driver asked to be interrupted when we use buffers (after ``push``)."""
        full_barrier()  # the used index we wrote must be visible before we read the flag
        return not self.memory.read_u16(self.avail) & AVAIL_F_NO_INTERRUPT

    def dump(self) -> str:
        """The ring as guest memory has it and as the device sees it, and the device's last
        pops and pushes: what to read when a guest reports the queue broken."""
        m, n = self.memory, self.size
        lines = [
            f"queue {self.index}: size {n}; device: next available {self.last_avail_idx}, "
            f"used index {self.used_idx}, holding {sorted(self.held)}",
            f"  guest memory: avail flags {m.read_u16(self.avail)} index "
            f"{m.read_u16(self.avail + 2)}, used flags {m.read_u16(self.used)} index "
            f"{m.read_u16(self.used + 2)}",
            "  avail ring: " + " ".join(str(m.read_u16(self.avail + 4 + 2 * i)) for i in range(n)),
            "  used ring: "
            + " ".join(
                "{}:{}".format(*_USED_ELEM.unpack(m.read(self.used + 4 + 8 * i, 8)))
                for i in range(n)
            ),
            "  descriptors (addr len flags next): "
            + "; ".join(
                "{}: {:#x} {} {} {}".format(i, *_DESC.unpack(m.read(self.desc + 16 * i, 16)))
                for i in range(n)
            ),
            "  history (oldest first): "
            + "; ".join(" ".join(map(str, entry)) for entry in self.history),
        ]
        return "\n".join(lines)

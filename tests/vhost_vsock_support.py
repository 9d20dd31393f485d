"""The guest's side of split virtqueues, for the vhost_vsock tests.

``Driver`` plays the virtio driver in a ``GuestMemory`` (a bytearray or a
memfd mapping): it writes descriptors, publishes chain heads in the available
ring and reads what the device put in the used ring, laid out exactly as a
guest lays a ring out, so the device code under test cannot tell the
difference. It can also write any descriptor at all, which is how the tests
play a hostile guest.
"""

from __future__ import annotations

import struct

from bulkhead.vhost_vsock.memory import GuestMemory, Region
from bulkhead.vhost_vsock.virtqueue import DESC_F_NEXT, DESC_F_WRITE

GUEST_BASE = 0x10_0000  # guest-physical address of the test RAM
USER_BASE = 0x7F00_0000_0000  # where "QEMU" has it mapped, for SET_VRING_ADDR


def bytearray_memory(size: int = 1 << 20) -> GuestMemory:
    return GuestMemory([Region(GUEST_BASE, size, USER_BASE, bytearray(size))])


class Driver:
    """One split ring of ``size`` entries at ``base`` (guest-physical) in ``memory``."""

    def __init__(self, memory: GuestMemory, base: int, size: int) -> None:
        self.memory = memory
        self.size = size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.end = self.used + 6 + 8 * size
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0
        for addr in range(self.desc, self.end, 2):
            memory.write_u16(addr, 0)

    # -- writing descriptors --

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.memory.write(self.desc + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def add_chain(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Chain ``(addr, len, device_writable)`` buffers into free descriptors; publish it."""
        indexes = [(self.next_desc + i) % self.size for i in range(len(buffers))]
        self.next_desc = (self.next_desc + len(buffers)) % self.size
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
            self.write_desc(indexes[i], addr, length, flags, 0 if last else indexes[i + 1])
        self.publish(indexes[0])
        return indexes[0]

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.memory.write_u16(self.avail + 2, value & 0xFFFF)

    def set_no_interrupt(self, on: bool) -> None:
        self.memory.write_u16(self.avail, 1 if on else 0)

    # -- reading what the device returned --

    def take_used(self) -> list[tuple[int, int]]:
        """``(head, written)`` for each chain the device returned since the last call."""
        used_idx = self.memory.read_u16(self.used + 2)
        out = []
        while self.used_seen != used_idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.memory.read(self.used + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class Allocator:
    """Buffers for chains: a bump allocator over guest memory past the rings."""

    def __init__(self, start: int, end: int) -> None:
        self.pos = start
        self.end = end

    def take(self, size: int) -> int:
        addr = (self.pos + 15) & ~15
        if addr + size > self.end:
            raise MemoryError("test guest memory exhausted")
        self.pos = addr + size
        return addr

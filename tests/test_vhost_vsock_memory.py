"""Guest memory translation: every guest-steered address is bounds-checked."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import pytest

from bulkhead.vhost_vsock.memory import GuestMemory, GuestMemoryError, Region
from bulkhead.vhost_vsock.protocol import MemRegion


def two_regions() -> GuestMemory:
    # A hole between the regions, like the PCI hole below 4 GiB.
    return GuestMemory(
        [
            Region(0x1000, 0x1000, 0x7000_0000, bytearray(0x1000)),
            Region(0x10000, 0x2000, 0x7000_8000, bytearray(0x3000), base=0x1000),
        ]
    )


def test_reads_and_writes_land_in_the_right_region() -> None:
    mem = two_regions()
    mem.write(0x1FF0, b"end of first")  # 12 bytes, ends inside the region
    assert mem.read(0x1FF0, 12) == b"end of first"
    mem.write_u32(0x10004, 0xDEADBEEF)
    assert mem.read_u32(0x10004) == 0xDEADBEEF
    # ``base``: the region starts 0x1000 into its buffer.
    assert mem.regions[1].buf[0x1004:0x1008] == (0xDEADBEEF).to_bytes(4, "little")
    mem.write_u16(0x11FFE, 0xABCD)
    assert mem.read_u16(0x11FFE) == 0xABCD
    assert mem.read_u64(0x10000) == 0xDEADBEEF << 32


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (0x0, 1),  # below all memory
        (0x0FFF, 2),  # starts before the first region
        (0x1FFF, 2),  # runs one byte past the first region's end
        (0x2000, 1),  # in the hole
        (0x11FFF, 2),  # past the end of the second region
        (0x12000, 1),  # just after it
        (0x1000, 0x10000),  # spans the hole and both regions
        (2**64 - 1, 2),  # wraps in C arithmetic
        (-1, 1),
        (0x1000, -1),
    ],
)
def test_out_of_bounds_ranges_are_refused(gpa: int, length: int) -> None:
    mem = two_regions()
    with pytest.raises(GuestMemoryError):
        mem.check(gpa, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            mem.read(gpa, length)
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"x" * length)


def test_edges_are_inclusive_exactly() -> None:
    mem = two_regions()
    mem.check(0x1000, 0x1000)  # the whole first region
    mem.check(0x2000, 0)  # an empty range at its end is harmless
    assert mem.read(0x11FFF, 1) == b"\0"


def test_front_end_addresses_translate_to_guest_addresses() -> None:
    mem = two_regions()
    assert mem.user_to_guest(0x7000_0010, 16) == 0x1010
    assert mem.user_to_guest(0x7000_8000, 0x2000) == 0x10000
    with pytest.raises(GuestMemoryError):
        mem.user_to_guest(0x7000_0FF0, 0x20)  # past the first region
    with pytest.raises(GuestMemoryError):
        mem.user_to_guest(0x1000, 1)  # a guest address is not a front-end one


def test_a_region_must_fit_its_buffer() -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory([Region(0, 0x2000, 0, bytearray(0x1000))])


def test_regions_are_mapped_from_memfds_at_their_offset() -> None:
    page = mmap.ALLOCATIONGRANULARITY
    fd = os.memfd_create("test-guest-ram")
    try:
        os.ftruncate(fd, 4 * page)
        os.pwrite(fd, b"page two", 2 * page)
        os.pwrite(fd, b"unaligned", 3 * page + 100)
        table = [
            MemRegion(guest_addr=0x8000, size=page, user_addr=0x1000, mmap_offset=2 * page),
            # An offset that is not page aligned is mapped from the page below.
            MemRegion(guest_addr=0x20000, size=64, user_addr=0x9000, mmap_offset=3 * page + 100),
        ]
        mem = GuestMemory.map(table, [fd, fd])
        try:
            assert mem.read(0x8000, 8) == b"page two"
            assert mem.read(0x20000, 9) == b"unaligned"
            mem.write(0x8008, b"!")
            assert os.pread(fd, 9, 2 * page) == b"page two!"  # shared with the "guest"
            with pytest.raises(GuestMemoryError):
                mem.read(0x20000 + 60, 8)
        finally:
            mem.close()
        with pytest.raises(GuestMemoryError, match="descriptors"):
            GuestMemory.map(table, [fd])
        with pytest.raises(GuestMemoryError, match="cannot map"):
            # Past the end of the file: refused rather than SIGBUS later.
            big = [MemRegion(0, 1 << 40, 0, 0)]
            GuestMemory.map(big, [fd])
    finally:
        os.close(fd)


# Another process (no shared GIL) reads the index the whole time, as the guest does.
_WATCHER = """
import mmap, os, struct, sys, time
m = mmap.mmap(int(sys.argv[1]), 4096)
u16 = struct.Struct("<H")
end = time.monotonic() + float(sys.argv[2])
reads = odd = 0
while time.monotonic() < end:
    for _ in range(10000):
        if u16.unpack_from(m, 2)[0] not in (0x1234, 0xABCD):
            odd += 1
    reads += 10000
print(reads, odd)
"""


def test_a_concurrent_reader_only_ever_sees_the_old_or_the_new_index() -> None:
    # struct.pack_into clears its target first: a guest reading the used index in that
    # instant saw 0 and took stale ring entries for new ones.
    fd = os.memfd_create("ring")
    os.ftruncate(fd, 4096)
    try:
        memory = GuestMemory.map([MemRegion(0x1000, 4096, 0, 0)], [fd])
        memory.write_u16(0x1002, 0x1234)
        watcher = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, str(fd), "1.5"],
            pass_fds=[fd],
            stdout=subprocess.PIPE,
            text=True,
        )
        value = 0x1234
        while watcher.poll() is None:
            for _ in range(1000):
                value ^= 0x1234 ^ 0xABCD
                memory.write_u16(0x1002, value)
        reads, odd = map(int, watcher.communicate(timeout=30)[0].split())
        assert reads > 100_000 and odd == 0, f"{odd} of {reads} reads saw neither value"
        memory.close()
    finally:
        os.close(fd)

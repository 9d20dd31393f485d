"""Split virtqueues in guest-like memory, fed by a test driver, hostile ones included."""

from __future__ import annotations

import pytest
from vhost_vsock_support import GUEST_BASE, Allocator, Driver, bytearray_memory

from bulkhead.vhost_vsock.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    ChainError,
    QueueError,
    Virtqueue,
)

SIZE = 8
MEM_SIZE = 1 << 20


@pytest.fixture
def ring() -> tuple[Driver, Virtqueue, Allocator]:
    mem = bytearray_memory(MEM_SIZE)
    driver = Driver(mem, GUEST_BASE, SIZE)
    queue = Virtqueue(mem, SIZE, driver.desc, driver.avail, driver.used, index=1)
    return driver, queue, Allocator(driver.end, GUEST_BASE + MEM_SIZE)


def test_chains_come_out_in_order_and_go_back_through_the_used_ring(ring) -> None:
    driver, queue, alloc = ring
    a, b, c = alloc.take(16), alloc.take(32), alloc.take(100)
    driver.memory.write(a, b"header..........")
    driver.memory.write(b, b"payload" + bytes(25))
    first = driver.add_chain([(a, 16, False), (b, 32, False)])
    second = driver.add_chain([(c, 100, True)])
    assert queue.pending() == 2

    chain = queue.pop()
    assert chain is not None and chain.head == first
    assert chain.readable == [(a, 16), (b, 32)] and chain.writable == []
    assert chain.read(driver.memory, 48).startswith(b"header..........payload")
    queue.push(chain.head, 0)

    chain = queue.pop()
    assert chain is not None and chain.head == second and chain.writable_len == 100
    assert chain.write(driver.memory, b"reply") == 5
    queue.push(chain.head, 5)
    assert queue.pop() is None
    assert driver.take_used() == [(first, 0), (second, 5)]
    assert driver.memory.read(c, 5) == b"reply"


def test_writes_scatter_over_several_buffers(ring) -> None:
    driver, queue, alloc = ring
    # Like Linux's rx buffers: a header-sized buffer, then the payload buffer.
    hdr, body = alloc.take(44), alloc.take(64)
    driver.add_chain([(hdr, 44, True), (body, 64, True)])
    chain = queue.pop()
    assert chain is not None
    data = bytes(range(100))
    assert chain.write(driver.memory, data) == 100
    assert driver.memory.read(hdr, 44) + driver.memory.read(body, 56) == data
    with pytest.raises(ChainError, match="do not fit"):
        chain.write(driver.memory, bytes(109))


def test_indexes_wrap_around_the_ring_and_65536(ring) -> None:
    driver, queue, alloc = ring
    buf = alloc.take(8)
    # Start near the u16 wrap, as a long-running guest would be.
    driver.avail_idx = queue.last_avail_idx = 0xFFFE
    for _ in range(3 * SIZE):
        head = driver.add_chain([(buf, 8, True)])
        chain = queue.pop()
        assert chain is not None and chain.head == head
        queue.push(head, 1)
    assert queue.last_avail_idx == (0xFFFE + 3 * SIZE) & 0xFFFF
    assert len(driver.take_used()) == 3 * SIZE


def test_interrupt_suppression_is_read_from_the_avail_flags(ring) -> None:
    driver, queue, _ = ring
    assert queue.wants_interrupt()
    driver.set_no_interrupt(True)
    assert not queue.wants_interrupt()


def test_unpop_gives_the_chain_back(ring) -> None:
    driver, queue, alloc = ring
    head = driver.add_chain([(alloc.take(8), 8, True)])
    chain = queue.pop()
    assert chain is not None
    queue.unpop(chain)
    again = queue.pop()
    assert again is not None and again.head == head


def test_a_head_goes_back_once_and_only_if_it_was_taken(ring) -> None:
    # A second return of the same head is what a Linux guest reports as "id N is
    # not a head!" before giving the queue up: refused here, the guest never sees it.
    driver, queue, alloc = ring
    head = driver.add_chain([(alloc.take(8), 8, True)])
    chain = queue.pop()
    assert chain is not None
    queue.push(chain.head, 8)
    with pytest.raises(QueueError, match=f"head {head}, which the device does not hold"):
        queue.push(chain.head, 8)
    with pytest.raises(QueueError, match="does not hold"):
        queue.push((head + 1) % SIZE, 0)  # never taken at all
    assert driver.take_used() == [(head, 8)]


def test_a_used_index_someone_else_wrote_stops_the_queue(ring) -> None:
    driver, queue, alloc = ring
    buf = alloc.take(8)
    driver.add_chain([(buf, 8, True)])
    chain = queue.pop()
    assert chain is not None
    queue.push(chain.head, 8)
    driver.memory.write_u16(driver.used + 2, 7)  # not the device's 1
    driver.add_chain([(buf, 8, True)])
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(QueueError, match="used index is 7 in guest memory, not 1"):
        queue.push(chain.head, 8)


def test_an_unpopped_chain_is_no_longer_held(ring) -> None:
    driver, queue, alloc = ring
    driver.add_chain([(alloc.take(8), 8, True)])
    chain = queue.pop()
    assert chain is not None
    queue.unpop(chain)
    with pytest.raises(QueueError, match="does not hold"):
        queue.push(chain.head, 0)
    assert driver.take_used() == []


# --- a hostile guest ----------------------------------------------------------


def test_a_head_beyond_the_table_is_dropped_without_a_head(ring) -> None:
    driver, queue, _ = ring
    driver.publish(SIZE)  # one past the last descriptor
    with pytest.raises(ChainError, match="beyond") as err:
        queue.pop()
    assert err.value.head is None
    assert queue.pop() is None  # it was consumed; the ring goes on


def test_a_next_beyond_the_table_is_refused(ring) -> None:
    driver, queue, alloc = ring
    driver.write_desc(0, alloc.take(8), 8, DESC_F_NEXT, 200)
    driver.publish(0)
    with pytest.raises(ChainError, match="points to 200") as err:
        queue.pop()
    assert err.value.head == 0  # so it can be returned to the guest


def test_a_descriptor_loop_is_refused(ring) -> None:
    driver, queue, alloc = ring
    buf = alloc.take(8)
    driver.write_desc(0, buf, 8, DESC_F_NEXT, 1)
    driver.write_desc(1, buf, 8, DESC_F_NEXT, 0)
    driver.publish(0)
    with pytest.raises(ChainError, match="loop") as err:
        queue.pop()
    assert err.value.head == 0


def test_a_chain_longer_than_the_queue_is_refused(ring) -> None:
    driver, queue, alloc = ring
    buf = alloc.take(8)
    for i in range(SIZE):  # every descriptor chained, the last back to the first
        driver.write_desc(i, buf, 8, DESC_F_NEXT, (i + 1) % SIZE)
    driver.publish(3)
    with pytest.raises(ChainError, match="longer than the queue"):
        queue.pop()


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (0x1000, 8),  # below guest memory
        (GUEST_BASE + MEM_SIZE - 4, 8),  # runs past its end
        (GUEST_BASE + MEM_SIZE, 1),  # just after it
        (GUEST_BASE, 0xFFFF_FFFF),  # a length no region has
        (2**64 - 8, 16),  # wraps in 64 bits
    ],
)
def test_buffers_outside_guest_memory_are_refused(ring, addr: int, length: int) -> None:
    driver, queue, _ = ring
    driver.write_desc(0, addr, length, DESC_F_WRITE)
    driver.publish(0)
    with pytest.raises(ChainError, match="descriptor 0") as err:
        queue.pop()
    assert err.value.head == 0


def test_an_empty_descriptor_anywhere_is_harmless(ring) -> None:
    driver, queue, _ = ring
    driver.write_desc(0, 2**63, 0, DESC_F_WRITE)
    driver.publish(0)
    chain = queue.pop()
    assert chain is not None and chain.writable_len == 0


def test_indirect_descriptors_are_refused_as_not_negotiated(ring) -> None:
    driver, queue, alloc = ring
    driver.write_desc(0, alloc.take(32), 32, DESC_F_INDIRECT)
    driver.publish(0)
    with pytest.raises(ChainError, match="indirect"):
        queue.pop()


def test_readable_after_writable_is_refused(ring) -> None:
    driver, queue, alloc = ring
    driver.write_desc(0, alloc.take(8), 8, DESC_F_WRITE | DESC_F_NEXT, 1)
    driver.write_desc(1, alloc.take(8), 8, 0)
    driver.publish(0)
    with pytest.raises(ChainError, match="after a writable"):
        queue.pop()


def test_reading_more_than_the_limit_is_refused(ring) -> None:
    driver, queue, alloc = ring
    driver.add_chain([(alloc.take(4096), 4096, False), (alloc.take(4096), 4096, False)])
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(ChainError, match="more than 5000"):
        chain.read(driver.memory, 5000)


def test_an_avail_index_too_far_ahead_breaks_the_queue(ring) -> None:
    driver, queue, _ = ring
    driver.set_avail_idx(SIZE + 1)
    with pytest.raises(QueueError, match="ahead"):
        queue.pop()


def test_bad_ring_layouts_are_refused() -> None:
    mem = bytearray_memory(1 << 16)
    base = GUEST_BASE
    with pytest.raises(QueueError, match="power of 2"):
        Virtqueue(mem, 6, base, base + 0x1000, base + 0x2000)
    with pytest.raises(QueueError, match="power of 2"):
        Virtqueue(mem, 0, base, base + 0x1000, base + 0x2000)
    with pytest.raises(QueueError, match="aligned"):
        Virtqueue(mem, 8, base + 8, base + 0x1000, base + 0x2000)
    with pytest.raises(QueueError, match="used ring"):
        Virtqueue(mem, 8, base, base + 0x1000, base + (1 << 16) - 16)  # runs off the end
    with pytest.raises(QueueError, match="descriptor table"):
        # A 64 KiB table 16 bytes into 64 KiB of memory: its last entry is outside.
        Virtqueue(mem, 4096, base + 16, base + 0x1000, base + 0x2000)


def test_a_head_offered_again_while_the_device_holds_it_breaks_the_queue(ring) -> None:
    driver, queue, alloc = ring
    head = driver.add_chain([(alloc.take(8), 8, True)])
    driver.publish(head)  # the same chain again, before it came back
    chain = queue.pop()
    assert chain is not None and chain.head == head
    with pytest.raises(QueueError, match=f"head {head} offered again while in use"):
        queue.pop()


def test_dump_shows_the_ring_and_the_last_pops_and_pushes(ring) -> None:
    driver, queue, alloc = ring
    head = driver.add_chain([(alloc.take(8), 8, True)])
    chain = queue.pop()
    assert chain is not None
    queue.push(chain.head, 5)
    text = queue.dump()
    assert "next available 1, used index 1, holding []" in text
    assert "avail flags 0 index 1, used flags 0 index 1" in text
    assert f"used ring: {head}:5 " in text
    assert f"history (oldest first): pop 0 1 {head}; push 0 {head} 5" in text

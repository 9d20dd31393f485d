"""The whole backend against a scripted front-end and guest, without QEMU.

The test plays QEMU (vhost-user messages over the real socket, guest RAM in a
memfd passed with SCM_RIGHTS, eventfds for kicks and calls) and the guest's
virtio-vsock driver (rings laid out in that memfd by ``Driver``), while host
programs use the backend's hybrid vsock socket as they would for real. The
backend runs its one thread, as in production.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vhost_vsock_support import GUEST_BASE, USER_BASE, Allocator, Driver

from bulkhead.errors import TransportError
from bulkhead.transport import HybridVsockTransport
from bulkhead.vhost_vsock import protocol as vu
from bulkhead.vhost_vsock.backend import FEATURES, PROTOCOL_FEATURES, Backend
from bulkhead.vhost_vsock.memory import GuestMemory
from bulkhead.vhost_vsock.packets import (
    HEADER_SIZE,
    HOST_CID,
    SHUTDOWN_BOTH,
    TYPE_STREAM,
    Header,
    Op,
    Packet,
    parse,
)

CID = 7
RAM = 1 << 20
QSIZE = 64  # descriptors are handed out round robin: room for 32 two-part chains
RX_BUF = 4096  # what Linux puts in each rx buffer, after a separate header buffer
DEADLINE = 10.0


class Frontend:
    """QEMU's side of the vhost-user socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(str(path))

    def send(self, request: int, payload: bytes = b"", fds=(), need_reply=False) -> None:
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        data = vu.Message(request, flags, payload).encode()
        socket.send_fds(self.sock, [data], list(fds))

    def call(self, request: int, payload: bytes = b"", fds=(), need_reply=False) -> bytes:
        self.send(request, payload, fds, need_reply)
        reply = vu.receive(self.sock)
        assert reply is not None, "the backend hung up"
        assert reply.request == request and reply.flags & vu.FLAG_REPLY
        return reply.payload

    def ack(self, request: int, payload: bytes = b"", fds=()) -> int:
        """Send with NEED_REPLY (REPLY_ACK): the backend's status, 0 for success."""
        return vu.decode_u64(self.call(request, payload, fds, need_reply=True))

    def close(self) -> None:
        self.sock.close()


class Guest:
    """The guest driver: rx and tx rings, buffers, kicks, and waiting for calls."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.rx = Driver(memory, GUEST_BASE, QSIZE)
        self.tx = Driver(memory, GUEST_BASE + 0x1000, QSIZE)
        self.alloc = Allocator(GUEST_BASE + 0x2000, GUEST_BASE + RAM)
        self.kicks = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.rx_bufs: dict[int, tuple[int, int]] = {}
        self.received: list[Packet] = []

    def close(self) -> None:
        for fd in self.kicks + self.calls:
            os.close(fd)

    def post_rx(self, count: int) -> None:
        for _ in range(count):
            hdr, body = self.alloc.take(HEADER_SIZE), self.alloc.take(RX_BUF)
            head = self.rx.add_chain([(hdr, HEADER_SIZE, True), (body, RX_BUF, True)])
            self.rx_bufs[head] = (hdr, body)
        os.eventfd_write(self.kicks[0], 1)

    def send(self, header: Header, payload: bytes = b"") -> None:
        header = Header(
            header.src_cid, header.dst_cid, header.src_port, header.dst_port, len(payload),
            header.type, header.op, header.flags, header.buf_alloc, header.fwd_cnt,
        )  # fmt: skip
        hdr = self.alloc.take(HEADER_SIZE)
        self.memory.write(hdr, header.pack())
        bufs = [(hdr, HEADER_SIZE, False)]
        if payload:
            body = self.alloc.take(len(payload))
            self.memory.write(body, payload)
            bufs.append((body, len(payload), False))
        self.tx.add_chain(bufs)
        os.eventfd_write(self.kicks[1], 1)

    def _collect_rx(self) -> None:
        for head, written in self.rx.take_used():
            hdr, body = self.rx_bufs.pop(head)
            raw = self.memory.read(hdr, HEADER_SIZE) + self.memory.read(body, RX_BUF)
            self.received.append(parse(raw[:written]))

    def wait_packet(self, op: Op, timeout: float = DEADLINE) -> Packet:
        """The first received packet with ``op`` (earlier ones of other ops stay queued)."""
        deadline = time.monotonic() + timeout
        while True:
            self._collect_rx()
            for i, pkt in enumerate(self.received):
                if pkt.header.op == op:
                    return self.received.pop(i)
            remaining = deadline - time.monotonic()
            seen = [Op(p.header.op).name for p in self.received]
            assert remaining > 0, f"no {op.name} from the backend; got {seen}"
            if select.select([self.calls[0]], [], [], remaining)[0]:
                os.eventfd_read(self.calls[0])

    def wait_tx_used(self, count: int, timeout: float = DEADLINE) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        used: list[tuple[int, int]] = []
        while len(used) < count:
            used += self.tx.take_used()
            remaining = deadline - time.monotonic()
            if len(used) >= count:
                break
            assert remaining > 0, f"only {len(used)} of {count} tx buffers came back"
            if select.select([self.calls[1]], [], [], remaining)[0]:
                os.eventfd_read(self.calls[1])
        return used

    def data(self, src_port: int, dst_port: int, size: int) -> bytes:
        """``size`` bytes of RW payload the backend sends on one connection."""
        out = b""
        while len(out) < size:
            self.post_rx(1)
            pkt = self.wait_packet(Op.RW)
            assert (pkt.header.src_port, pkt.header.dst_port) == (src_port, dst_port)
            out += pkt.payload
        return out


def from_guest(op: Op, src_port: int, dst_port: int, **kw: int) -> Header:
    return Header(
        kw.get("src_cid", CID), HOST_CID, src_port, dst_port, 0, TYPE_STREAM, op,
        kw.get("flags", 0), kw.get("buf_alloc", 65536), kw.get("fwd_cnt", 0),
    )  # fmt: skip


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="bhvv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def backend(workdir: Path) -> Iterator[Backend]:
    b = Backend(workdir / "vu.sock", CID, workdir / "vsock", buf_alloc=64 * 1024)
    thread = threading.Thread(target=b.serve_forever, name="backend", daemon=True)
    thread.start()
    yield b
    b.stop()
    thread.join(DEADLINE)
    assert not thread.is_alive(), "the backend did not stop"
    assert not (workdir / "vu.sock").exists() and not (workdir / "vsock").exists()


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, RAM)
    yield fd
    os.close(fd)


def negotiate(fe: Frontend) -> None:
    assert vu.decode_u64(fe.call(vu.Request.GET_FEATURES)) == FEATURES
    fe.send(vu.Request.SET_FEATURES, vu.encode_u64(FEATURES))
    assert vu.decode_u64(fe.call(vu.Request.GET_PROTOCOL_FEATURES)) == PROTOCOL_FEATURES
    fe.send(vu.Request.SET_PROTOCOL_FEATURES, vu.encode_u64(PROTOCOL_FEATURES))
    fe.send(vu.Request.SET_OWNER)


def start_device(fe: Frontend, ram: int) -> Guest:
    """What QEMU does when the guest driver sets DRIVER_OK: memory, then each ring."""
    negotiate(fe)
    table = vu.encode_mem_table([vu.MemRegion(GUEST_BASE, RAM, USER_BASE, 0)])
    assert fe.ack(vu.Request.SET_MEM_TABLE, table, [ram]) == 0
    guest = Guest(GuestMemory.map([vu.MemRegion(GUEST_BASE, RAM, USER_BASE, 0)], [ram]))

    def user(gpa: int) -> int:
        return USER_BASE + gpa - GUEST_BASE

    for index, ring in enumerate((guest.rx, guest.tx)):
        fe.send(vu.Request.SET_VRING_NUM, vu.VringState(index, QSIZE).encode())
        fe.send(vu.Request.SET_VRING_BASE, vu.VringState(index, 0).encode())
        addr = vu.VringAddr(index, 0, user(ring.desc), user(ring.used), user(ring.avail), 0)
        fe.send(vu.Request.SET_VRING_ADDR, addr.encode())
        fe.send(vu.Request.SET_VRING_KICK, vu.encode_u64(index), [guest.kicks[index]])
        fe.send(vu.Request.SET_VRING_CALL, vu.encode_u64(index), [guest.calls[index]])
        assert fe.ack(vu.Request.SET_VRING_ENABLE, vu.VringState(index, 1).encode()) == 0
    return guest


@pytest.fixture
def device(backend: Backend, workdir: Path, ram: int) -> Iterator[tuple[Frontend, Guest]]:
    fe = Frontend(workdir / "vu.sock")
    guest = start_device(fe, ram)
    yield fe, guest
    fe.close()
    guest.memory.close()
    guest.close()


def connect_async(uds: Path, port: int) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result["sock"] = HybridVsockTransport(uds, port).connect(timeout=DEADLINE)
        except TransportError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


# --- vhost-user -------------------------------------------------------------------


def test_features_config_and_unknown_requests(backend: Backend, workdir: Path) -> None:
    fe = Frontend(workdir / "vu.sock")
    try:
        negotiate(fe)
        config = vu.ConfigSpace.decode(
            fe.call(vu.Request.GET_CONFIG, vu.ConfigSpace(0, 8, 0, bytes(8)).encode())
        )
        assert int.from_bytes(config.data, "little") == CID and config.size == 8
        assert vu.decode_u64(fe.call(vu.Request.GET_QUEUE_NUM)) == 3
        # Read-only configuration, requests we do not implement: failures, not crashes.
        assert fe.ack(vu.Request.SET_CONFIG, vu.ConfigSpace(0, 8, 0, bytes(8)).encode()) != 0
        assert fe.ack(99) != 0
        assert fe.ack(vu.Request.SET_VRING_NUM, vu.VringState(200, 8).encode()) != 0
        out_of_range = vu.ConfigSpace(250, 8, 0, bytes(8)).encode()
        assert vu.ConfigSpace.decode(fe.call(vu.Request.GET_CONFIG, out_of_range)).size == 0
        assert vu.decode_u64(fe.call(vu.Request.GET_FEATURES)) == FEATURES  # still serving
    finally:
        fe.close()


def test_a_second_front_end_is_refused(backend: Backend, workdir: Path) -> None:
    first = Frontend(workdir / "vu.sock")
    second = Frontend(workdir / "vu.sock")
    try:
        assert second.sock.recv(1) == b""
        assert vu.decode_u64(first.call(vu.Request.GET_FEATURES)) == FEATURES
    finally:
        first.close()
        second.close()


def test_a_garbage_stream_drops_the_front_end_and_the_next_one_works(
    backend: Backend, workdir: Path
) -> None:
    fe = Frontend(workdir / "vu.sock")
    fe.sock.sendall(b"\xff" * 12)  # a header with a bad version
    assert fe.sock.recv(1) == b""
    fe.close()
    fe = Frontend(workdir / "vu.sock")
    try:
        assert vu.decode_u64(fe.call(vu.Request.GET_FEATURES)) == FEATURES
    finally:
        fe.close()


# --- streams through the rings ----------------------------------------------------


def test_a_host_connection_to_a_guest_port(device, workdir: Path) -> None:
    _, guest = device
    guest.post_rx(4)
    thread, result = connect_async(workdir / "vsock", 1024)
    req = guest.wait_packet(Op.REQUEST).header
    assert (req.src_cid, req.dst_cid, req.dst_port) == (HOST_CID, CID, 1024)
    host_port = req.src_port
    guest.send(from_guest(Op.RESPONSE, 1024, host_port))
    thread.join(DEADLINE)
    sock: socket.socket = result["sock"]
    with sock:
        sock.settimeout(DEADLINE)
        sock.sendall(b"ping from the host")
        assert guest.data(host_port, 1024, 18) == b"ping from the host"
        guest.send(from_guest(Op.RW, 1024, host_port), b"pong from the guest")
        assert sock.recv(100) == b"pong from the guest"
        # The host closes its side: the guest hears SHUTDOWN, closes too, gets the RST.
        sock.shutdown(socket.SHUT_WR)
        guest.post_rx(2)
        assert guest.wait_packet(Op.SHUTDOWN).header.flags & 2
        guest.send(from_guest(Op.SHUTDOWN, 1024, host_port, flags=SHUTDOWN_BOTH))
        assert guest.wait_packet(Op.RST).header.dst_port == 1024
        assert sock.recv(1) == b""


def test_bulk_data_both_ways_respects_credit(device, workdir: Path) -> None:
    _, guest = device
    guest.post_rx(1)
    thread, result = connect_async(workdir / "vsock", 1024)
    host_port = guest.wait_packet(Op.REQUEST).header.src_port
    # The guest offers only 10000 bytes of buffer.
    guest.send(from_guest(Op.RESPONSE, 1024, host_port, buf_alloc=10000))
    thread.join(DEADLINE)
    sock: socket.socket = result["sock"]
    with sock:
        sock.settimeout(DEADLINE)
        blob = os.urandom(30000)
        sender = threading.Thread(target=sock.sendall, args=(blob,), daemon=True)
        sender.start()
        got = guest.data(host_port, 1024, 10000)
        assert len(got) == 10000
        # Credit exhausted: another rx buffer stays unused until the guest reads.
        guest.post_rx(1)
        with pytest.raises(AssertionError, match="no RW"):
            guest.wait_packet(Op.RW, timeout=0.5)
        for consumed in (10000, 20000):
            # The guest's application read it all: each update allows 10000 more.
            update = from_guest(
                Op.CREDIT_UPDATE, 1024, host_port, buf_alloc=10000, fwd_cnt=consumed
            )
            guest.send(update)
            got += guest.data(host_port, 1024, consumed + 10000 - len(got))
        assert got == blob
        sender.join(DEADLINE)
        # Guest to host: 64 KiB of our credit at most before the host reads.
        chunk = os.urandom(32 * 1024)
        guest.send(from_guest(Op.RW, 1024, host_port), chunk)
        guest.send(from_guest(Op.RW, 1024, host_port), chunk)
        received = b""
        while len(received) < 2 * len(chunk):
            received += sock.recv(65536)
        assert received == chunk * 2
        # Having taken it all, the host socket freed the buffer: CREDIT_UPDATEs say so. The
        # first chunk may already have been reported on its own (a spare rx buffer was
        # posted), so read updates until one covers both; each only ever grows.
        reported = 0
        while reported < 2 * len(chunk):
            guest.post_rx(1)
            update = guest.wait_packet(Op.CREDIT_UPDATE).header
            assert update.buf_alloc == 64 * 1024
            assert reported < update.fwd_cnt <= 2 * len(chunk)
            reported = update.fwd_cnt


def test_guest_connections_reach_host_sockets(device, workdir: Path) -> None:
    _, guest = device
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(workdir) + "/vsock_5000")
    listener.listen(1)
    listener.settimeout(DEADLINE)
    with listener:
        guest.post_rx(4)
        guest.send(from_guest(Op.REQUEST, 40000, 5000))
        resp = guest.wait_packet(Op.RESPONSE).header
        assert (resp.src_port, resp.dst_port) == (5000, 40000)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(DEADLINE)
            guest.send(from_guest(Op.RW, 40000, 5000), b"hello host")
            assert conn.recv(100) == b"hello host"
            conn.sendall(b"hello guest")
            assert guest.data(5000, 40000, 11) == b"hello guest"
        # Nobody on port 5001: the guest's REQUEST is reset.
        guest.send(from_guest(Op.REQUEST, 40001, 5001))
        rst = guest.wait_packet(Op.RST).header
        assert (rst.src_port, rst.dst_port) == (5001, 40001)


def test_a_refused_guest_port_refuses_the_host_client(device, workdir: Path) -> None:
    _, guest = device
    guest.post_rx(2)
    thread, result = connect_async(workdir / "vsock", 9999)
    req = guest.wait_packet(Op.REQUEST).header
    guest.send(from_guest(Op.RST, 9999, req.src_port))
    thread.join(DEADLINE)
    assert "refused" in str(result["error"])


def test_many_connections_at_once(device, workdir: Path) -> None:
    _, guest = device
    count = 10
    guest.post_rx(count)
    threads = [connect_async(workdir / "vsock", 2000 + i) for i in range(count)]
    ports = {}
    for _ in range(count):
        req = guest.wait_packet(Op.REQUEST).header
        ports[req.dst_port] = req.src_port
        guest.send(from_guest(Op.RESPONSE, req.dst_port, req.src_port))
    socks = []
    for thread, result in threads:
        thread.join(DEADLINE)
        socks.append(result["sock"])
    for i in range(count):
        guest.send(from_guest(Op.RW, 2000 + i, ports[2000 + i]), f"to {i}".encode())
    for i, sock in enumerate(socks):
        sock.settimeout(DEADLINE)
        assert sock.recv(100) == f"to {i}".encode()
        sock.close()


def test_a_client_that_gives_up_while_connecting_resets_the_request(device, workdir: Path) -> None:
    _, guest = device
    guest.post_rx(2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(workdir / "vsock"))
        sock.sendall(b"CONNECT 1024\n")
        req = guest.wait_packet(Op.REQUEST).header
    # The guest has not answered; the client is gone: the guest hears the request reset.
    rst = guest.wait_packet(Op.RST).header
    assert (rst.src_port, rst.dst_port) == (req.src_port, 1024)


def test_an_idle_backend_sleeps(device, workdir: Path) -> None:
    # Device running, a connection open, nothing to do: the thread must be asleep in
    # select, not polling. (A busy loop would burn the whole interval.)
    _, guest = device
    guest.post_rx(2)
    thread, result = connect_async(workdir / "vsock", 1024)
    host_port = guest.wait_packet(Op.REQUEST).header.src_port
    guest.send(from_guest(Op.RESPONSE, 1024, host_port))
    thread.join(DEADLINE)
    with result["sock"]:
        guest.wait_tx_used(1)
        before = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - before < 0.1


# --- a hostile guest --------------------------------------------------------------


def test_hostile_tx_buffers_are_dropped_and_the_device_goes_on(device, workdir: Path) -> None:
    fe, guest = device
    tx = guest.tx
    good = guest.alloc.take(HEADER_SIZE)
    # 1: a buffer outside guest memory; 2: a loop; 3: a header promising more than there is.
    tx.write_desc(10, 0xDEAD_0000_0000, 44)
    tx.publish(10)
    tx.write_desc(11, good, 44, 1, 12)
    tx.write_desc(12, good, 44, 1, 11)
    tx.publish(11)
    lying = Header(CID, HOST_CID, 1, 1, 500, TYPE_STREAM, Op.RW)
    guest.memory.write(good, lying.pack())
    tx.write_desc(13, good, 44)
    tx.publish(13)
    tx.publish(QSIZE + 5)  # a head beyond the table: cannot even be returned
    tx.next_desc = 0
    os.eventfd_write(guest.kicks[1], 1)
    assert sorted(guest.wait_tx_used(3)) == [(10, 0), (11, 0), (13, 0)]
    # The device still works: a REQUEST to a port nobody serves is reset.
    guest.post_rx(1)
    guest.send(from_guest(Op.REQUEST, 40000, 6000))
    assert guest.wait_packet(Op.RST).header.dst_port == 40000
    # And so does vhost-user.
    assert vu.decode_u64(fe.call(vu.Request.GET_FEATURES)) == FEATURES


def test_a_broken_avail_index_stops_only_that_queue(device, workdir: Path) -> None:
    fe, guest = device
    guest.tx.set_avail_idx(guest.tx.avail_idx + QSIZE + 1)
    os.eventfd_write(guest.kicks[1], 1)
    # The backend logs and stops using the tx ring; the front-end is still answered.
    state = vu.VringState.decode(fe.call(vu.Request.GET_VRING_BASE, vu.VringState(1, 0).encode()))
    assert state.index == 1 and state.num == 0


def test_stopping_the_device_resets_its_connections(device, workdir: Path) -> None:
    fe, guest = device
    guest.post_rx(1)
    thread, result = connect_async(workdir / "vsock", 1024)
    host_port = guest.wait_packet(Op.REQUEST).header.src_port
    guest.send(from_guest(Op.RESPONSE, 1024, host_port))
    thread.join(DEADLINE)
    sock: socket.socket = result["sock"]
    with sock:
        sock.settimeout(DEADLINE)
        guest.wait_tx_used(1)
        # GET_VRING_BASE is how QEMU stops a ring; it reports where the guest was.
        state = fe.call(vu.Request.GET_VRING_BASE, vu.VringState(1, 0).encode())
        assert vu.VringState.decode(state) == vu.VringState(1, 1)
        assert sock.recv(1) == b""  # the host connection went with the device


def test_a_dump_request_logs_each_running_queue(
    device, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    _, guest = device
    caplog.set_level("INFO", logger="bulkhead.vhost_vsock.backend")
    guest.post_rx(2)
    backend.request_dump()  # what SIGUSR1 does in the backend process
    deadline = time.monotonic() + DEADLINE
    while "queue 1: size" not in caplog.text:
        assert time.monotonic() < deadline, f"no dump logged: {caplog.text}"
        time.sleep(0.05)
    assert f"queue 0: size {QSIZE}; device: next available 0" in caplog.text
    assert "queue 2: not running" in caplog.text

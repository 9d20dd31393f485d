"""The virtio-vsock stream protocol on the host side, without sockets or rings.

``VsockMux`` keeps every connection between the guest and host programs. The
backend feeds it what the guest sent (``on_guest_packet``) and what happened
on the host sockets (``host_connect``, ``host_data``, ``host_delivered``,
``host_eof``, ``host_failed``, ``guest_accepted``/``guest_refused``), asks it
for the next packet for the guest's rx queue (``next_packet``), and after
each round acts on the connections it marks dirty (``take_dirty``): write
``greeting`` and ``to_host`` to the host socket, connect one for a guest
request (``open_requested``), half-close it (``host_shutdown_due``), close
it (``closed``), read at most ``host_read_budget()`` from it.

Flow control is the spec's credit scheme, both ways:

- host to guest: every guest header tells its receive buffer (``buf_alloc``)
  and how much of it its application has consumed (``fwd_cnt``); we never
  have more than ``buf_alloc`` bytes unconsumed in the guest
  (``tx_cnt - peer_fwd_cnt``), and read the host socket only as far as that
  credit goes.
- guest to host: we offer ``buf_alloc`` bytes per connection, count what the
  guest sent (``rx_cnt``) and what the host socket took (``fwd_cnt``), reset
  a guest that sends beyond that, and tell it about consumed space with a
  CREDIT_UPDATE once a quarter of the buffer has been freed (or when asked
  with CREDIT_REQUEST); every packet we send carries the same figures.

Closing: a direction ends with a SHUTDOWN (guest to us: flag SEND; us to the
guest: after host EOF and the data before it). When neither side will send
any more and the host socket has everything, we reset the connection (RST),
which is what a Linux guest waits for after its own SHUTDOWN, close the host
socket and forget the connection. Anything the guest does against the
protocol (data before the handshake or after its SHUTDOWN, beyond its
credit, unknown ops, a second REQUEST) resets the connection; packets for
unknown connections are answered with RST.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .packets import (
    HEADER_SIZE,
    HOST_CID,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Header,
    Op,
    Packet,
)

log = logging.getLogger(__name__)

DEFAULT_BUF_ALLOC = 256 * 1024
# What we buffer from a host socket for the guest, on top of the credit limit.
MAX_TO_GUEST = 256 * 1024
MAX_CONNECTIONS = 4096
# Ports we give host-initiated connections: far above what guests listen on
# or pick as ephemeral ports, so the two kinds of keys do not meet.
FIRST_HOST_PORT = 1 << 30
# Queued packets for connections that no longer exist (RSTs): beyond this, a
# guest that floods us with junk gets no answers rather than our memory.
MAX_ORPHAN_PACKETS = 1024

_U32 = 0xFFFFFFFF


class State(enum.Enum):
    CONNECTING = "connecting"  # host-initiated: REQUEST sent; guest-initiated: host socket pending
    ESTABLISHED = "established"
    CLOSED = "closed"


class MuxError(Exception):
    """A host-side request the mux cannot honour (e.g. too many connections)."""


@dataclass(eq=False)
class Connection:
    host_port: int
    guest_port: int
    from_host: bool  # who sent the REQUEST
    buf_alloc: int
    state: State = State.CONNECTING
    # guest -> host
    rx_cnt: int = 0  # payload bytes taken from the guest
    fwd_cnt: int = 0  # of those, bytes the host socket has accepted
    reported_fwd_cnt: int = 0  # fwd_cnt as last told to the guest
    to_host: bytearray = field(default_factory=bytearray)
    greeting: bytes = b""  # what to write to the host socket before any data
    # host -> guest
    tx_cnt: int = 0  # payload bytes sent to the guest (mod 2**32)
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    to_guest: bytearray = field(default_factory=bytearray)
    # closing
    guest_shut: int = 0  # SHUTDOWN flags the guest sent (RCV: it takes no more; SEND)
    host_eof: bool = False  # the host socket will send no more
    shutdown_sent: bool = False  # our SHUTDOWN(SEND) is queued
    host_shut_wr: bool = False  # the backend has half-closed the host socket
    reset_by_guest: bool = False
    # requests to the backend
    open_requested: bool = False  # guest-initiated: connect a host socket
    credit_update_queued: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def __repr__(self) -> str:
        who = "host" if self.from_host else "guest"
        return f"<vsock {self.host_port}<->{self.guest_port} from {who} {self.state.value}>"

    def peer_credit(self) -> int:
        """How many more bytes the guest can take now."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)

    def host_read_budget(self) -> int:
        """How much the backend may read from the host socket now."""
        if self.state is not State.ESTABLISHED or self.host_eof or self.guest_shut & SHUTDOWN_RCV:
            return 0
        return max(0, min(self.peer_credit(), MAX_TO_GUEST) - len(self.to_guest))

    @property
    def host_shutdown_due(self) -> bool:
        """The guest will send no more and the host has it all: half-close the host socket."""
        return bool(self.guest_shut & SHUTDOWN_SEND) and not self.to_host and not self.host_shut_wr

    def _header(self, guest_cid: int, op: Op, flags: int = 0, length: int = 0) -> Header:
        self.reported_fwd_cnt = self.fwd_cnt
        return Header(
            HOST_CID,
            guest_cid,
            self.host_port,
            self.guest_port,
            length,
            TYPE_STREAM,
            op,
            flags,
            self.buf_alloc,
            self.fwd_cnt & _U32,
        )


class VsockMux:
    def __init__(self, guest_cid: int, *, buf_alloc: int = DEFAULT_BUF_ALLOC) -> None:
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.conns: dict[tuple[int, int], Connection] = {}
        # Packets to send before any data, in order: ("conn", conn, op, flags)
        # is built when sent (current credit; skipped if conn has gone), a
        # Header is an RST for a connection that no longer exists.
        self._control: deque[tuple[Connection, Op, int] | Header] = deque()
        self._orphans = 0
        self._ready: deque[Connection] = deque()  # conns with data for the guest, round robin
        self._dirty: dict[Connection, None] = {}  # insertion-ordered set
        self._ports = itertools.count(FIRST_HOST_PORT)
        self.dropped_packets = 0

    # -- bookkeeping --

    def _touch(self, conn: Connection) -> None:
        self._dirty[conn] = None

    def touch(self, conn: Connection) -> None:
        """Have ``conn`` come back from ``take_dirty`` (its host socket did something)."""
        self._touch(conn)

    def take_dirty(self) -> list[Connection]:
        """The connections whose state changed since the last call."""
        dirty = list(self._dirty)
        self._dirty.clear()
        return dirty

    def _queue(self, conn: Connection, op: Op, flags: int = 0) -> None:
        self._control.append((conn, op, flags))

    def _queue_rst(self, header: Header) -> None:
        if self._orphans >= MAX_ORPHAN_PACKETS:
            self.dropped_packets += 1
            return
        self._orphans += 1
        self._control.append(header)

    def _rst_for(self, h: Header) -> Header:
        """A reset answering guest packet ``h`` (addresses swapped)."""
        return Header(h.dst_cid, h.src_cid, h.dst_port, h.src_port, 0, TYPE_STREAM, Op.RST)

    def _live(self, conn: Connection) -> bool:
        return self.conns.get(conn.key) is conn

    def _remove(self, conn: Connection) -> None:
        log.debug(
            "closed %r: %d bytes to the host, %d to the guest", conn, conn.fwd_cnt, conn.tx_cnt
        )
        conn.state = State.CLOSED
        conn.to_guest.clear()
        if self._live(conn):
            del self.conns[conn.key]
        self._touch(conn)

    def abort(self, conn: Connection, reason: str = "", *, level: int = logging.WARNING) -> None:
        """Reset ``conn`` (RST to the guest) and close it."""
        if conn.closed:
            return
        if reason:
            log.log(level, "resetting %r: %s", conn, reason)
        if not conn.reset_by_guest:
            self._queue_rst(conn._header(self.guest_cid, Op.RST))
        self._remove(conn)

    def reset_all(self) -> None:
        """The device went away (ring stopped, front-end gone): every connection is over."""
        for conn in list(self.conns.values()):
            self._remove(conn)
        self._control.clear()
        self._orphans = 0
        self._ready.clear()

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self.conns.values()))

    # -- host side --

    def host_connect(self, guest_port: int) -> Connection:
        """A host program wants guest port ``guest_port``: send the guest a REQUEST."""
        if not 0 <= guest_port <= _U32:
            raise MuxError(f"port {guest_port} is not a vsock port")
        if len(self.conns) >= MAX_CONNECTIONS:
            raise MuxError(f"too many vsock connections ({len(self.conns)})")
        while True:
            port = next(self._ports)
            if port > _U32:
                self._ports = itertools.count(FIRST_HOST_PORT)
                continue
            if (port, guest_port) not in self.conns:
                break
        conn = Connection(port, guest_port, from_host=True, buf_alloc=self.buf_alloc)
        self.conns[conn.key] = conn
        self._queue(conn, Op.REQUEST)
        log.debug("host connects to guest port %d: %r", guest_port, conn)
        return conn

    def guest_accepted(self, conn: Connection) -> None:
        """The host socket for a guest REQUEST is connected: answer RESPONSE."""
        conn.open_requested = False
        if conn.closed:
            return
        conn.state = State.ESTABLISHED
        self._queue(conn, Op.RESPONSE)
        self._touch(conn)

    def guest_refused(self, conn: Connection) -> None:
        """Nothing listens on the host for a guest REQUEST: reset it."""
        conn.open_requested = False
        self.abort(conn)

    def host_data(self, conn: Connection, data: bytes) -> None:
        """Bytes the host socket produced (at most ``host_read_budget()`` of them)."""
        if conn.closed or not data:
            return
        conn.to_guest += data
        self._make_ready(conn)

    def host_eof(self, conn: Connection) -> None:
        """The host socket will send no more: SHUTDOWN(SEND) to the guest after its data."""
        if conn.closed or conn.host_eof:
            return
        conn.host_eof = True
        if conn.state is not State.ESTABLISHED:
            # Nobody to tell yet (still connecting): give up on the connection.
            self.abort(conn)
            return
        self._after_host_flush(conn)

    def host_delivered(self, conn: Connection, count: int) -> None:
        """The host socket took ``count`` bytes from the front of ``to_host``."""
        del conn.to_host[:count]
        conn.fwd_cnt += count
        if conn.closed:
            return
        if conn.fwd_cnt - conn.reported_fwd_cnt >= conn.buf_alloc // 4:
            self._credit_update(conn)
        self._maybe_finish(conn)

    def host_shut_down(self, conn: Connection) -> None:
        """The backend half-closed the host socket (``host_shutdown_due``)."""
        conn.host_shut_wr = True
        self._maybe_finish(conn)

    def host_failed(self, conn: Connection, reason: str = "") -> None:
        """The host socket broke (reset, write error): reset the guest side too."""
        # Host programs closing abruptly is ordinary (a gRPC channel closed mid-stream).
        self.abort(conn, reason, level=logging.INFO)

    # -- guest side --

    def on_guest_packet(self, pkt: Packet) -> None:
        h = pkt.header
        if h.src_cid != self.guest_cid:
            # Spoofed or confused: not worth an answer, which would go to that CID.
            self._drop(h, f"source CID is not the guest's ({self.guest_cid})")
            return
        if h.op == Op.RST and (h.dst_port, h.src_port) not in self.conns:
            return  # a reset of something we have forgotten already
        if h.dst_cid != HOST_CID:
            self._drop(h, "not addressed to the host", reply=True)
            return
        if h.type != TYPE_STREAM:
            conn = self.conns.get((h.dst_port, h.src_port))
            if conn is not None:
                self.abort(conn, f"guest sent socket type {h.type}")
            else:
                self._drop(h, f"socket type {h.type} is not supported", reply=True)
            return
        conn = self.conns.get((h.dst_port, h.src_port))
        if conn is None:
            if h.op == Op.REQUEST:
                self._guest_request(h)
            else:
                # Usually in flight when we reset the connection: not worth a warning.
                self._drop(h, "no such connection", reply=True, level=logging.DEBUG)
            return
        if h.op != Op.RST:
            self._peer_credit(conn, h)
        if h.op == Op.RW:
            self._guest_data(conn, h, pkt.payload)
        elif h.op == Op.CREDIT_UPDATE:
            pass  # the credit is all it carries
        elif h.op == Op.CREDIT_REQUEST:
            self._credit_update(conn)
        elif h.op == Op.RESPONSE:
            if conn.from_host and conn.state is State.CONNECTING:
                conn.state = State.ESTABLISHED
                conn.greeting = f"OK {conn.host_port}\n".encode()
                self._touch(conn)
                log.debug("established %r", conn)
            else:
                self.abort(conn, "unexpected RESPONSE")
        elif h.op == Op.SHUTDOWN:
            self._guest_shutdown(conn, h.flags)
        elif h.op == Op.RST:
            conn.reset_by_guest = True
            if conn.state is not State.ESTABLISHED:
                self._remove(conn)  # a refused REQUEST: nothing to deliver
            else:
                self._guest_shutdown(conn, SHUTDOWN_BOTH)
        elif h.op == Op.REQUEST:
            self.abort(conn, "REQUEST for an existing connection")
        else:
            self.abort(conn, f"unknown op {h.op}")

    def _drop(
        self, h: Header, why: str, *, reply: bool = False, level: int = logging.WARNING
    ) -> None:
        self.dropped_packets += 1
        log.log(level, "dropping guest packet %s: %s", h.describe(), why)
        if reply and h.op != Op.RST:
            self._queue_rst(self._rst_for(h))

    def _guest_request(self, h: Header) -> None:
        if len(self.conns) >= MAX_CONNECTIONS:
            self._drop(h, f"too many vsock connections ({len(self.conns)})", reply=True)
            return
        conn = Connection(h.dst_port, h.src_port, from_host=False, buf_alloc=self.buf_alloc)
        self._peer_credit(conn, h)
        conn.open_requested = True
        self.conns[conn.key] = conn
        self._touch(conn)
        log.debug("guest connects to host port %d: %r", h.dst_port, conn)

    def _peer_credit(self, conn: Connection, h: Header) -> None:
        before = conn.peer_credit()
        conn.peer_buf_alloc = h.buf_alloc
        conn.peer_fwd_cnt = h.fwd_cnt
        if conn.peer_credit() > before:
            self._touch(conn)  # the backend may read the host socket again
            if conn.to_guest:
                self._make_ready(conn)

    def _guest_data(self, conn: Connection, h: Header, payload: bytes) -> None:
        if conn.state is not State.ESTABLISHED:
            self.abort(conn, "data before the connection was established")
            return
        if conn.guest_shut & SHUTDOWN_SEND:
            self.abort(conn, "data after the guest's SHUTDOWN")
            return
        if not payload:
            return
        unconsumed = conn.rx_cnt - conn.fwd_cnt
        if unconsumed + len(payload) > conn.buf_alloc:
            self.abort(
                conn,
                f"guest sent {len(payload)} bytes with {conn.buf_alloc - unconsumed} of credit",
            )
            return
        conn.to_host += payload
        conn.rx_cnt += len(payload)
        self._touch(conn)

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        conn.guest_shut |= flags & SHUTDOWN_BOTH
        if conn.guest_shut & SHUTDOWN_RCV:
            conn.to_guest.clear()  # it will not read them
        self._touch(conn)
        self._maybe_finish(conn)

    def _credit_update(self, conn: Connection) -> None:
        if not conn.credit_update_queued and not conn.closed:
            conn.credit_update_queued = True
            self._queue(conn, Op.CREDIT_UPDATE)

    # -- closing --

    def _after_host_flush(self, conn: Connection) -> None:
        """Once the guest has all the host's data, tell it about the host's EOF."""
        if conn.host_eof and not conn.to_guest and not conn.shutdown_sent:
            conn.shutdown_sent = True
            if not conn.guest_shut & SHUTDOWN_RCV:
                self._queue(conn, Op.SHUTDOWN, SHUTDOWN_SEND)
        self._maybe_finish(conn)

    def _maybe_finish(self, conn: Connection) -> None:
        if conn.closed or conn.state is not State.ESTABLISHED:
            return
        guest_done = bool(conn.guest_shut & SHUTDOWN_SEND) and not conn.to_host
        host_done = conn.shutdown_sent or bool(conn.guest_shut & SHUTDOWN_RCV)
        if guest_done and host_done:
            self.abort(conn)

    # -- packets for the guest --

    def _make_ready(self, conn: Connection) -> None:
        if conn not in self._ready:
            self._ready.append(conn)

    def has_output(self) -> bool:
        """Whether ``next_packet`` has something to send (so an rx buffer is worth taking)."""
        if self._control:
            return True
        return any(self._sendable(conn) for conn in self._ready)

    def _sendable(self, conn: Connection) -> bool:
        return (
            not conn.closed
            and conn.state is State.ESTABLISHED
            and bool(conn.to_guest)
            and conn.peer_credit() > 0
        )

    def next_packet(self, capacity: int) -> Packet | None:
        """The next packet for an rx buffer of ``capacity`` bytes (header included)."""
        if capacity < HEADER_SIZE:
            return None
        while self._control:
            entry = self._control.popleft()
            if isinstance(entry, Header):
                self._orphans -= 1
                return Packet(entry)
            conn, op, flags = entry
            if op == Op.CREDIT_UPDATE:
                conn.credit_update_queued = False
            if self._live(conn):
                return Packet(conn._header(self.guest_cid, op, flags))
        for _ in range(len(self._ready)):
            conn = self._ready.popleft()
            if not self._sendable(conn):
                if conn.to_guest and not conn.closed:
                    self._ready.append(conn)  # waits for credit
                continue
            n = min(len(conn.to_guest), conn.peer_credit(), capacity - HEADER_SIZE)
            payload = bytes(conn.to_guest[:n])
            del conn.to_guest[:n]
            pkt = Packet(conn._header(self.guest_cid, Op.RW, 0, n), payload)
            conn.tx_cnt = (conn.tx_cnt + n) & _U32
            if conn.to_guest:
                self._ready.append(conn)
            self._touch(conn)  # room in to_guest: the host socket may be read again
            self._after_host_flush(conn)
            return pkt
        return None

"""One mux session over the serial port: host connections relayed to the gRPC socket.

The session only sees whole frames and a ``Port`` to send frames on; the port
(``serial.py``) owns the file descriptor, reconnects and output buffering.

Flow control, per connection, both ways (see ``bulkhead_proto.mux``):

- guest → host: what the gRPC side writes is sent as DATA only within the
  connection's send ``Credit``; the rest waits in a backlog and reading from the
  gRPC socket pauses until the host returns CREDIT. So the guest never has more
  than WINDOW unacknowledged bytes in flight per connection.
- host → guest: DATA is written to the gRPC socket and CREDIT is returned only
  for bytes that actually left the transport's buffer for the kernel, so a slow
  gRPC reader slows the host down instead of filling the agent's memory.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from bulkhead_init.log import Logger
from bulkhead_proto import mux

# More than any sane host opens at once; a bound on memory if one misbehaves.
MAX_CONNS = 1024
# A HELLO's header (magic, type, payload length, conn 0): where to pick the
# stream up again after garbage.
_HELLO_HEADER = mux.hello(0)[: mux.HEADER.size]


class Port(Protocol):
    def send(self, frame: bytes) -> None: ...

    def discard_output(self) -> None: ...


class _LocalConn(asyncio.Protocol):
    """One host connection's counterpart: a connection to the gRPC socket."""

    def __init__(self, session: MuxSession, conn: int) -> None:
        self.session = session
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.detached = False  # no longer in the session's table: send nothing more
        self.local_closed = False
        self.early: list[bytes] = []  # host data that arrived before the connect finished
        # host → guest accounting
        self.received = 0  # bytes the host sent us
        self.written = 0  # bytes handed to the transport
        self.delivered = 0  # bytes that left the transport's buffer
        self.window = mux.ReceiveWindow()
        # guest → host
        self.credit = mux.Credit()
        self.backlog = bytearray()
        self.connect_task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol (the gRPC side) --------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # high=0: resume_writing() fires exactly when the buffer is empty again,
        # which is when buffered host bytes count as delivered.
        transport.set_write_buffer_limits(high=0)
        for chunk in self.early:
            self._write(chunk)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.detached:
            return
        if self.backlog:
            self.backlog += data
            return
        n = self.credit.take(len(data))
        if n:
            self.session.send_data(self.conn, memoryview(data)[:n])
        if n < len(data):
            self.backlog += memoryview(data)[n:]
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # the mux has no half-close: close fully

    def connection_lost(self, exc: Exception | None) -> None:
        self.local_closed = True
        if not self.detached and not self.backlog:
            self.session.local_closed(self)
        # else: CLOSE follows once the host has taken the backlog (see add_credit).

    def resume_writing(self) -> None:
        self._account()

    # -- from the host ---------------------------------------------------

    def deliver(self, payload: bytes) -> None:
        self.received += len(payload)
        if self.received - self.delivered > mux.WINDOW:
            self.session.violation(self, "sent more DATA than its credit")
            return
        if self.transport is None:
            self.early.append(payload)
        else:
            self._write(payload)

    def add_credit(self, n: int) -> None:
        self.credit.grant(n)
        if not self.backlog:
            return
        take = self.credit.take(len(self.backlog))
        if take:
            self.session.send_data(self.conn, memoryview(self.backlog[:take]))
            del self.backlog[:take]
        if self.backlog:
            return
        if self.local_closed:
            self.session.local_closed(self)
        elif self.transport is not None:
            self.transport.resume_reading()

    def detach(self, graceful: bool) -> None:
        """Forget the session: flush-and-close (host CLOSE) or abort (session reset)."""
        self.detached = True
        self.backlog.clear()
        self.early.clear()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()

    # -- internals -------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing():
            return
        self.transport.write(data)
        self.written += len(data)
        self._account()

    def _account(self) -> None:
        if self.detached or self.transport is None:
            return
        delivered = self.written - self.transport.get_write_buffer_size()
        fresh, self.delivered = delivered - self.delivered, delivered
        if fresh > 0 and (amount := self.window.consume(fresh)):
            self.session.port.send(mux.credit(self.conn, amount))


class MuxSession:
    def __init__(
        self, port: Port, socket_path: str, log: Logger, raw_socket_path: str | None = None
    ) -> None:
        self.port = port
        self.socket_path = socket_path
        self.log = log
        # Benchmark only (bulkhead.bench=1, see bench_raw): connections are then made at
        # their first DATA, which may ask for the raw byte source instead of gRPC.
        self.raw_socket_path = raw_socket_path
        self._raw_magic = b""
        if raw_socket_path is not None:
            from .bench_raw import RAW_MAGIC

            self._raw_magic = RAW_MAGIC
        self._parser = mux.Parser()
        self._conns: dict[int, _LocalConn] = {}
        self.session_id = 0  # ours, new each time the port is opened
        self._peer_session: int | None = None  # the host's, from its last HELLO
        self._resyncing = False  # after garbage: skip bytes until a HELLO
        self._resync = bytearray()
        self._epoch = 0  # bumped by reset(): frames parsed before it are void

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def begin(self) -> None:
        """Start a new guest session and announce it at once.

        Called when the port is (re)opened, and after garbage on the stream. The
        HELLO tells the host to drop its connections of our previous session and
        say HELLO again, which starts our session with it.
        """
        self.reset()
        self.session_id = mux.new_session()
        self.port.discard_output()
        self.port.send(mux.hello(self.session_id))

    def feed(self, data: bytes) -> None:
        """Bytes read from the port."""
        if self._resyncing:
            self._resync += data
            self._scan_for_hello()
            return
        try:
            frames = self._parser.feed(data)
        except mux.MuxError as exc:
            # Garbage (e.g. the tail of a frame from before an agent restart):
            # the next frame boundary cannot be found, so start a new session
            # and pick the stream up at the HELLO the host answers it with.
            self.log.warning(f"serial: bad mux stream ({exc}); new session, waiting for HELLO")
            self.begin()
            self._resyncing = True
            self._resync += data
            self._scan_for_hello()
            return
        self._dispatch_all(frames)

    def _dispatch_all(self, frames: list[mux.Frame]) -> None:
        epoch = self._epoch
        for frame in frames:
            if self._epoch != epoch:
                return  # the port hung up while sending a reply: the rest is void
            self._dispatch(frame)

    def reset(self) -> None:
        """The byte stream ended (host gone, port closed): forget everything."""
        self._epoch += 1
        self._drop_connections()
        self._parser.reset()
        self._resync.clear()
        self._resyncing = False
        self._peer_session = None

    def _drop_connections(self) -> None:
        conns, self._conns = self._conns, {}
        for c in conns.values():
            c.detach(graceful=False)
        if conns:
            self.log.info(f"serial: dropped {len(conns)} connection(s) of the previous session")

    # -- called by connections --------------------------------------------

    def send_data(self, conn: int, data: memoryview) -> None:
        for frame in mux.encode_data(conn, data):
            self.port.send(frame)

    def local_closed(self, c: _LocalConn) -> None:
        if self._conns.get(c.conn) is c:
            del self._conns[c.conn]
            c.detached = True
            self.port.send(mux.encode(mux.FrameType.CLOSE, c.conn))

    def violation(self, c: _LocalConn, what: str) -> None:
        self.log.warning(f"serial: host connection {c.conn} {what}; closing it")
        if self._conns.get(c.conn) is c:
            del self._conns[c.conn]
        c.detach(graceful=False)
        self.port.send(mux.encode(mux.FrameType.CLOSE, c.conn))

    # -- internals ---------------------------------------------------------

    def _scan_for_hello(self) -> None:
        buf = self._resync
        start = 0
        while (at := buf.find(_HELLO_HEADER, start)) >= 0:
            self._parser.reset()
            try:
                frames = self._parser.feed(bytes(buf[at:]))
            except mux.MuxError:
                start = at + 1  # more garbage behind that HELLO: try a later one
                continue
            buf.clear()
            self._resyncing = False
            self._dispatch_all(frames)
            return
        # Keep what could be the start of a HELLO header split across reads.
        del buf[: max(0, len(buf) - len(_HELLO_HEADER) + 1)]

    def _dispatch(self, frame: mux.Frame) -> None:
        kind = frame.type
        if kind is mux.FrameType.DATA:
            c = self._conns.get(frame.conn)
            if c is not None:
                if c.connect_task is None:  # bench mode's first DATA: pick the target
                    raw = self._raw_magic and frame.payload.startswith(self._raw_magic)
                    self._start_connect(c, self.raw_socket_path if raw else self.socket_path)
                c.deliver(frame.payload)
            else:
                # Unknown (closed, or from before an agent restart): tell the host.
                self.port.send(mux.encode(mux.FrameType.CLOSE, frame.conn))
        elif kind is mux.FrameType.CREDIT:
            c = self._conns.get(frame.conn)
            if c is not None:
                try:
                    c.add_credit(mux.credit_amount(frame))
                except mux.MuxError as exc:
                    self.violation(c, str(exc))
        elif kind is mux.FrameType.OPEN:
            self._open(frame.conn)
        elif kind is mux.FrameType.CLOSE:
            c = self._conns.pop(frame.conn, None)
            if c is not None:
                c.detach(graceful=True)  # deliver what the host sent before closing
        elif kind is mux.FrameType.HELLO:
            self._hello(frame)

    def _hello(self, frame: mux.Frame) -> None:
        try:
            session = mux.hello_session(frame)
        except mux.MuxError as exc:
            self.log.warning(f"serial: ignoring the host's HELLO: {exc}")
            return
        if session != self._peer_session:
            # A new host session (or the first one we see): whatever was open
            # belongs to a host that is gone, and so do frames queued for it.
            # The byte stream itself goes on: the parser keeps what follows.
            self._drop_connections()
            self.port.discard_output()
            self._peer_session = session
            self.log.info(f"serial: host session {session:08x} (ours {self.session_id:08x})")
        # Every HELLO is answered; repeats of one session change nothing else.
        self.port.send(mux.hello(self.session_id))

    def _open(self, conn: int) -> None:
        if conn in self._conns:
            self.log.warning(f"serial: host opened connection {conn} twice; ignoring")
            return
        if len(self._conns) >= MAX_CONNS:
            self.log.warning(f"serial: over {MAX_CONNS} connections; refusing {conn}")
            self.port.send(mux.encode(mux.FrameType.CLOSE, conn))
            return
        c = _LocalConn(self, conn)
        self._conns[conn] = c
        if self.raw_socket_path is None:
            self._start_connect(c, self.socket_path)

    def _start_connect(self, c: _LocalConn, path: str | None) -> None:
        assert path is not None
        c.connect_task = asyncio.get_running_loop().create_task(self._connect(c, path))

    async def _connect(self, c: _LocalConn, path: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_unix_connection(lambda: c, path)
        except OSError as exc:
            self.log.error(f"serial: cannot reach {path} for connection {c.conn}: {exc}")
            c.local_closed = True
            self.local_closed(c)
            return
        if c.detached and c.transport is not None:
            c.transport.abort()
